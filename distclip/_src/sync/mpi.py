"""The MPI backend: processes started by `mpirun` or `srun` that neither Horovod nor tf.distribute joins.

mpi4py's world can check and broadcast variables between steps (`verify_replicas`,
`broadcast_from_root`), but it has no collective inside a TensorFlow graph, so
it cannot synchronize gradients: the clip path refuses it rather than clip
each process's own gradients (initialize Horovod, create a
MultiWorkerMirroredStrategy, or pass `backend="none"` if each process trains alone).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, List, Sequence

import numpy as np
import tensorflow as tf

from distclip._src.errors import ContextError
from distclip._src.norm import Gradient
from distclip._src.sync.base import OneReplicaPerProcess
from distclip._src.variables import tf_variable

# Set by the launchers in every process they start: Open MPI's mpirun, and Slurm's srun (per job step).
_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def _launched() -> bool:
    """Whether a launcher (mpirun, srun) says it started several processes."""
    return any(os.environ.get(v, "1").strip() not in ("", "0", "1") for v in _WORLD_SIZE_VARIABLES)


def _world():
    """mpi4py's COMM_WORLD if this process is one of several MPI processes, else None.

    mpi4py is imported only where the program already did, or where a launcher
    says it started several processes (importing it initializes MPI).
    """
    if "mpi4py.MPI" not in sys.modules and not _launched():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def active() -> bool:
    """Whether this process is one of several in an MPI world (see `_world`)."""
    return _world() is not None


class MPIBackend(OneReplicaPerProcess):
    name = "mpi"

    def __init__(self):
        self._comm = _world()
        if self._comm is None:
            if _launched() and importlib.util.find_spec("mpi4py") is None:
                raise ContextError("mpirun or srun started several processes, but mpi4py, which distclip talks to "
                                   "them with, is not installed: pip install mpi4py")
            raise ContextError("no MPI world of more than one process (launch with mpirun or srun, and mpi4py)")

    def rank(self) -> int:
        return self._comm.Get_rank()

    def size(self) -> int:
        return self._comm.Get_size()

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]:
        raise ContextError(
            f"this is one of {self.size()} MPI processes, but neither Horovod nor a tf.distribute strategy "
            "synchronizes their gradients, and MPI alone cannot inside a TensorFlow step: call hvd.init() "
            "(import horovod.tensorflow as hvd), or train under MultiWorkerMirroredStrategy; pass backend='none' "
            "if each process trains a model of its own")

    def broadcast(self, variables: Sequence[Any], root: int) -> None:
        for v in variables:
            target = tf_variable(v)
            target.assign(self._comm.bcast(target.numpy(), root=root))

    def all_gather(self, local: Callable[[], tf.Tensor], name: str) -> np.ndarray:
        return np.stack(self._comm.allgather(np.asarray(local())))
