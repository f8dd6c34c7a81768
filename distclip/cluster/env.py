"""Who am I in the job, whichever launcher started this process; and a TF_CONFIG for the job.

    info = distclip.cluster.info()        # rank, size, local_rank, local_size, launcher
    distclip.cluster.pin_gpu(info)         # one GPU per process, by local rank
    distclip.cluster.set_tf_config()       # then tf.distribute.MultiWorkerMirroredStrategy()

Launchers recognised, first match wins: an initialized Horovod; `horovodrun`
(HOROVOD_RANK...); Open MPI's `mpirun` (OMPI_COMM_WORLD_*); Slurm's `srun`
(SLURM_PROCID..., also under `--mpi=pmix`); a `TF_CONFIG`; else a single process.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from distclip._src.errors import ContextError


@dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the job, as `info()` reads it from the launcher.

    Args:
      rank: this process's rank, in [0, size).
      size: the number of processes in the job.
      local_rank: this process's rank among those on its machine.
      local_size: the number of processes on its machine.
      launcher: what started it: "horovod" (an initialized Horovod), "horovodrun", "mpirun", "slurm",
        "tf_config" or "none".
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str


def _int(env: Dict[str, str], *names: str, least: int = 0) -> Optional[int]:
    """The first of `names` that is set (non-empty), as an integer >= `least`; None if none is set.

    Raises:
      ContextError: the variable is set to anything else, naming it and its value.
    """
    for name in names:
        text = env.get(name, "").strip()
        if text:
            if not (text.isascii() and text.isdigit()) or int(text) < least:
                raise ContextError(f"{name} must be a whole number >= {least}; got {name}={env[name]!r}")
            return int(text)
    return None


def _slurm_tasks_per_node(name: str, spec: str) -> List[int]:
    """Expands Slurm's "2(x3),1" into [2, 2, 2, 1]."""
    out: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"([1-9]\d*)(?:\(x([1-9]\d*)\))?", part.strip())
        if not m:
            raise ContextError(f"cannot parse {name}={spec!r}: expected counts >= 1 such as '2(x3),1'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _checked(cluster: ClusterInfo, names: str) -> ClusterInfo:
    """`cluster` if its rank lies in its size and its local rank in its local size; else an error naming `names`."""
    if not (cluster.rank < cluster.size and cluster.local_rank < cluster.local_size <= cluster.size):
        raise ContextError(f"inconsistent {cluster.launcher} variables {names}: rank {cluster.rank} of "
                           f"{cluster.size}, local rank {cluster.local_rank} of {cluster.local_size}")
    return cluster


def _from_tf_config(text: str) -> ClusterInfo:
    def bad(why: str) -> ContextError:
        return ContextError(f"TF_CONFIG {why}; got TF_CONFIG={text!r}")

    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict) or not isinstance(cfg.get("task"), dict):
        raise bad('must be a JSON object with a "cluster" object and a "task" object')
    tasks = []
    for kind in ("chief", "worker"):
        addresses = cfg["cluster"].get(kind, [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise bad(f'cluster["{kind}"] must be a list of "host:port" strings')
        tasks += [(kind, a) for a in addresses]
    task = cfg["task"]
    kind, index = task.get("type"), task.get("index", 0)
    mine = [i for i, (t, _) in enumerate(tasks) if t == kind]
    if kind not in ("chief", "worker") or not mine:
        raise bad(f'task["type"] must be "chief" or "worker", with addresses in cluster; got {kind!r}')
    if type(index) is not int or not 0 <= index < len(mine):
        raise bad(f'task["index"] must be a whole number from 0 to {len(mine) - 1}; got {index!r}')
    me = mine[index]
    host = tasks[me][1].rsplit(":", 1)[0]
    same_host = [i for i, (_, a) in enumerate(tasks) if a.rsplit(":", 1)[0] == host]
    return ClusterInfo(me, len(tasks), same_host.index(me), len(same_host), "tf_config")


def info(env: Optional[Dict[str, str]] = None) -> ClusterInfo:
    """This process's rank, world size, local rank and local size, and which launcher said so.

    Read from an initialized Horovod, then the variables of horovodrun, Open
    MPI's mpirun, Slurm (srun) and TF_CONFIG, first found wins.

    Args:
      env: the environment to read (default: this process's).

    Returns:
      The `ClusterInfo`; rank 0 of 1 with launcher "none" if no launcher is found.

    Raises:
      ContextError: a launcher variable is malformed (not a whole number, a rank beyond the size, a TF_CONFIG
        that does not name this task), naming the variable and its value.
    """
    from_process = env is None
    env = dict(os.environ if env is None else env)
    hvd = sys.modules.get("horovod.tensorflow")
    if from_process and hvd is not None and hvd.is_initialized():
        return ClusterInfo(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), "horovod")
    for launcher, prefix in (("horovodrun", "HOROVOD_"), ("mpirun", "OMPI_COMM_WORLD_")):
        rank = _int(env, f"{prefix}RANK")
        if rank is not None:
            names = f"{prefix}RANK, {prefix}SIZE, {prefix}LOCAL_RANK, {prefix}LOCAL_SIZE"
            return _checked(ClusterInfo(rank, _int(env, f"{prefix}SIZE", least=1) or 1,
                                        _int(env, f"{prefix}LOCAL_RANK") or 0,
                                        _int(env, f"{prefix}LOCAL_SIZE", least=1) or 1, launcher), names)
    rank = _int(env, "SLURM_PROCID")
    size = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", least=1)
    if rank is not None and size is not None:
        per_node = "SLURM_STEP_TASKS_PER_NODE" if env.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
        counts = _slurm_tasks_per_node(per_node, env.get(per_node) or "1")
        node = _int(env, "SLURM_NODEID") or 0
        return _checked(ClusterInfo(rank, size, _int(env, "SLURM_LOCALID") or 0, counts[min(node, len(counts) - 1)],
                                    "slurm"),
                        "SLURM_PROCID, SLURM_STEP_NUM_TASKS (SLURM_NTASKS), SLURM_LOCALID, " + per_node)
    if env.get("TF_CONFIG"):
        return _from_tf_config(env["TF_CONFIG"])
    return ClusterInfo(0, 1, 0, 1, "none")


def pin_gpu(cluster: Optional[ClusterInfo] = None) -> Optional[str]:
    """Makes this process see one GPU, chosen by local rank; returns its name, or None without GPUs.

    Where the launcher already gave each task one GPU (Slurm's
    `--gpus-per-task=1`, or CUDA_VISIBLE_DEVICES per rank), that one is used.
    Call it before TensorFlow initialises its devices.

    Args:
      cluster: this process's place in the job (default: `info()`).

    Returns:
      The GPU's name, or None on a machine without GPUs.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    cluster = cluster or info()
    gpu = gpus[0] if len(gpus) == 1 else gpus[cluster.local_rank % len(gpus)]
    tf.config.set_visible_devices(gpu, "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)
    return gpu.name


def free_ports(n: int, host: str = "") -> List[int]:
    """`n` distinct ports free on `host` right now, held together while picked.

    Args:
      n: how many ports.
      host: the interface to bind ("" = every interface).

    Returns:
      The port numbers.
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(cluster: Optional[ClusterInfo] = None) -> dict:
    """A TF_CONFIG for MultiWorkerMirroredStrategy with one worker per rank.

    With MPI (mpirun, or srun --mpi=pmix): every rank picks a free port on its
    own host and the ranks allgather "host:port" with mpi4py, so two jobs that
    share a node never collide. Without MPI under Slurm: SlurmClusterResolver,
    with a port base derived from the job id.

    Args:
      cluster: this process's place in the job (default: `info()`).

    Returns:
      The TF_CONFIG, as a dict.

    Raises:
      ContextError: several ranks from a launcher that gives no way to agree on addresses.
    """
    cluster = cluster or info()
    if cluster.launcher in ("mpirun", "slurm", "horovodrun"):
        try:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        except ImportError:
            comm = None
        if comm is not None and comm.Get_size() == cluster.size > 1:
            workers = comm.allgather(f"{socket.gethostname()}:{free_ports(1)[0]}")
            return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": comm.Get_rank()}}
        if cluster.launcher == "slurm":
            import tensorflow as tf

            job = int(os.environ.get("SLURM_JOB_ID", "0"))
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=15000 + (job % 1000) * 20)
            return {"cluster": resolver.cluster_spec().as_dict(),
                    "task": {"type": resolver.task_type, "index": resolver.task_id}}
    if cluster.size == 1:
        return {"cluster": {"worker": [f"localhost:{free_ports(1)[0]}"]}, "task": {"type": "worker", "index": 0}}
    raise ContextError(f"cannot build a TF_CONFIG for {cluster.size} ranks launched by {cluster.launcher}: "
                       "launch with mpirun or srun (and mpi4py), or set TF_CONFIG yourself")


def set_tf_config(cluster: Optional[ClusterInfo] = None) -> dict:
    """Sets os.environ["TF_CONFIG"] from `tf_config` unless it is already set.

    Args:
      cluster: this process's place in the job (default: `info()`).

    Returns:
      The TF_CONFIG in effect, as a dict.
    """
    if os.environ.get("TF_CONFIG"):
        return json.loads(os.environ["TF_CONFIG"])
    cfg = tf_config(cluster)
    os.environ["TF_CONFIG"] = json.dumps(cfg)
    return cfg
