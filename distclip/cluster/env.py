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

from distclip.errors import ArgumentError, ContextError


@dataclass(frozen=True)
class ClusterInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str  # "horovod", "horovodrun", "mpirun", "slurm", "tf_config" or "none"


def _int(env: Dict[str, str], *names: str) -> Optional[int]:
    for name in names:
        if env.get(name, "").strip().lstrip("-").isdigit():
            return int(env[name])
    return None


def _slurm_tasks_per_node(spec: str) -> List[int]:
    """Expands Slurm's "2(x3),1" into [2, 2, 2, 1]."""
    out: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ContextError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def info(env: Optional[Dict[str, str]] = None) -> ClusterInfo:
    """This process's rank, world size, local rank and local size, and which launcher said so."""
    from_process = env is None
    env = dict(os.environ if env is None else env)
    hvd = sys.modules.get("horovod.tensorflow")
    if from_process and hvd is not None and hvd.is_initialized():
        return ClusterInfo(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), "horovod")
    if _int(env, "HOROVOD_RANK") is not None:
        return ClusterInfo(_int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_SIZE") or 1,
                           _int(env, "HOROVOD_LOCAL_RANK") or 0, _int(env, "HOROVOD_LOCAL_SIZE") or 1, "horovodrun")
    if _int(env, "OMPI_COMM_WORLD_RANK") is not None:
        return ClusterInfo(_int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE") or 1,
                           _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1,
                           "mpirun")
    if _int(env, "SLURM_PROCID") is not None and _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") is not None:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        counts = _slurm_tasks_per_node(per_node)
        node = _int(env, "SLURM_NODEID") or 0
        return ClusterInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                           _int(env, "SLURM_LOCALID") or 0, counts[min(node, len(counts) - 1)], "slurm")
    if env.get("TF_CONFIG"):
        try:
            cfg = json.loads(env["TF_CONFIG"])
        except json.JSONDecodeError as e:
            raise ArgumentError(f"TF_CONFIG is not valid JSON: {e}") from None
        tasks = [(t, a) for t in ("chief", "worker") for a in cfg.get("cluster", {}).get(t, [])]
        task = cfg.get("task", {})
        me = [i for i, (t, _) in enumerate(tasks) if t == task.get("type")][task.get("index", 0)]
        host = tasks[me][1].rsplit(":", 1)[0]
        same_host = [i for i, (_, a) in enumerate(tasks) if a.rsplit(":", 1)[0] == host]
        return ClusterInfo(me, len(tasks), same_host.index(me), len(same_host), "tf_config")
    return ClusterInfo(0, 1, 0, 1, "none")


def pin_gpu(cluster: Optional[ClusterInfo] = None) -> Optional[str]:
    """Makes this process see one GPU, chosen by local rank; returns its name, or None without GPUs.

    Where the launcher already gave each task one GPU (Slurm's
    `--gpus-per-task=1`, or CUDA_VISIBLE_DEVICES per rank), that one is used.
    Call it before TensorFlow initialises its devices.
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
    """`n` distinct ports free on `host` ("" = every interface) right now, held together while picked."""
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
    """
    cluster = cluster or info()
    if cluster.launcher in ("mpirun", "slurm", "horovodrun"):
        try:
            from mpi4py import MPI
        except ImportError:
            MPI = None
        if MPI is not None and MPI.COMM_WORLD.Get_size() == cluster.size > 1:
            comm = MPI.COMM_WORLD
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
    """Sets os.environ["TF_CONFIG"] from `tf_config` unless it is already set; returns it."""
    if os.environ.get("TF_CONFIG"):
        return json.loads(os.environ["TF_CONFIG"])
    cfg = tf_config(cluster)
    os.environ["TF_CONFIG"] = json.dumps(cfg)
    return cfg
