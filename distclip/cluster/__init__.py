"""Running distclip on a cluster: who this process is, how jobs start, and whether replicas agree.

    info = distclip.cluster.info()        # rank, size, local_rank, local_size, launcher
    distclip.cluster.pin_gpu(info)         # one GPU per process, by local rank
    distclip.cluster.set_tf_config()       # then tf.distribute.MultiWorkerMirroredStrategy()

The operations tooling, apart from the clip step (which never imports it):
  * `env`: this process's place in the job from the launcher's variables, GPU pinning, TF_CONFIG;
  * `strategies`: a tf.distribute strategy by name (`make_strategy`);
  * `verify`: `verify_replicas`, bit-for-bit agreement of variables across replicas;
  * `processes`: `current_backend`, this process's rank among the job's replicas, and all-gathers between
    steps (imported on first use: it loads TensorFlow);
  * `launcher`, `watchdog`, `netns`: `python -m distclip.cluster.launcher | watchdog | netns`,
    what `launch/` and `slurm/` run (no TensorFlow imported).
"""
from distclip.cluster.env import ClusterInfo, free_ports, info, pin_gpu, set_tf_config, tf_config
from distclip.cluster.strategies import STRATEGIES, make_strategy

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["ClusterInfo", "info", "pin_gpu", "tf_config", "set_tf_config", "free_ports", "STRATEGIES", "make_strategy",
           "current_backend"]

if TYPE_CHECKING:  # pragma: no cover
    from distclip.cluster.processes import current_backend  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "current_backend":  # TensorFlow is loaded on first use only
        return getattr(import_module("distclip.cluster.processes"), name)
    raise AttributeError(f"module 'distclip.cluster' has no attribute {name!r}")
