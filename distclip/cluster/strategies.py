"""Creating a tf.distribute strategy by name, for `distclip train` and scripts like it.

Call `make_strategy` before any other TensorFlow op: splitting a CPU into
logical devices and MultiWorkerMirroredStrategy both need an uninitialised runtime.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from distclip._src.errors import ArgumentError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")
"""The names `make_strategy` takes (and `distclip train --strategy`, besides "horovod")."""


def _tf_config_workers() -> int:
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError as e:
        raise ArgumentError(f"TF_CONFIG is not valid JSON: {e}") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(name: str = "auto", replicas: int = 2,
                  collective_timeout_s: float = 120.0) -> "tf.distribute.Strategy":
    """The strategy called `name`:

    * "default": no distribution (TensorFlow's default strategy);
    * "mirrored": `MirroredStrategy` over `replicas` GPUs, or, without GPUs,
      over `replicas` logical devices split from the CPU;
    * "multiworker": `MultiWorkerMirroredStrategy` from `TF_CONFIG`, or, without
      one, from the ranks of `mpirun`/`srun` (`distclip.cluster.set_tf_config`);
      a collective that waits on a dead peer fails after `collective_timeout_s` seconds;
    * "tpu": `TPUStrategy` on the TPU that `TPUClusterResolver` finds;
    * "auto": "multiworker" if `TF_CONFIG` names more than one worker, else "mirrored".

    Args:
      name: one of `STRATEGIES`.
      replicas: the replicas of "mirrored", 1 or more.
      collective_timeout_s: how long a collective of "multiworker" waits for a peer, in seconds.

    Returns:
      The `tf.distribute.Strategy`.

    Raises:
      ArgumentError: an unknown `name`, a bad `replicas`, or more replicas than GPUs.
      RuntimeError: no TPU reached ("tpu"), or too few logical CPU devices left to split.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ArgumentError(f"strategy must be one of {STRATEGIES}; got strategy={name!r}")
    if not isinstance(replicas, int) or replicas < 1:
        raise ArgumentError(f"replicas must be a positive integer; got replicas={replicas!r}")
    if name == "auto":
        name = "multiworker" if _tf_config_workers() > 1 else "mirrored"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        from distclip.cluster.env import set_tf_config

        set_tf_config()  # unless TF_CONFIG is set: from the ranks of mpirun or srun
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_s)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise RuntimeError(f"--strategy tpu: no TPU could be reached ({e})") from None
        return tf.distribute.TPUStrategy(resolver)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if len(gpus) < replicas:
            raise ArgumentError(f"replicas={replicas} but only {len(gpus)} GPUs are visible")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(replicas)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        pass  # already initialised: use the logical devices it has, if there are enough
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < replicas:
        raise RuntimeError(
            f"replicas={replicas} needs {replicas} logical CPU devices, but TensorFlow was initialised with "
            f"{len(devices)}: create the strategy before any other TensorFlow op"
        )
    return tf.distribute.MirroredStrategy([d.name for d in devices[:replicas]])
