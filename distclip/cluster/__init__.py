"""Running distclip on a cluster: who this process is, how jobs start, and whether replicas agree.

    info = distclip.cluster.info()        # rank, size, local_rank, local_size, launcher
    distclip.cluster.pin_gpu(info)         # one GPU per process, by local rank
    distclip.cluster.set_tf_config()       # then tf.distribute.MultiWorkerMirroredStrategy()

The operations tooling, apart from the clip step (which never imports it):
  * `env`: this process's place in the job from the launcher's variables, GPU pinning, TF_CONFIG;
  * `strategies`: a tf.distribute strategy by name (`make_strategy`);
  * `verify`: `verify_replicas`, bit-for-bit agreement of variables across replicas;
  * `launcher`, `watchdog`, `netns`: `python -m distclip.cluster.launcher | watchdog | netns`,
    what `launch/` and `slurm/` run (no TensorFlow imported).
"""
from distclip.cluster.env import ClusterInfo, free_ports, info, pin_gpu, set_tf_config, tf_config

__all__ = ["ClusterInfo", "info", "pin_gpu", "tf_config", "set_tf_config", "free_ports"]
