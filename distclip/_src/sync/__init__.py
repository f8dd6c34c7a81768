"""How replicas are kept identical: one small backend per way of running replicas, and the one place that picks it.

`current(variables)` is the backend of this process and context, first match wins:
  1. "tf_distribute": a tf.distribute strategy with more than one replica in
     sync (that of `variables` if they are mirrored, else the one in scope or
     running: MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy);
  2. "horovod": Horovod, imported and initialized by the program, with more than one process;
  3. "mpi": one of several processes of an MPI world (mpirun, srun), for
     checks and broadcasts between steps only (see `distclip._src.sync.mpi`);
  4. "none": a single replica (no strategy, the default strategy, `OneDeviceStrategy`).
The clip path (`backend="auto"`), `broadcast_from_root` and `verify_replicas`
all ask it. `select(backend)` honours an explicit `backend=` option instead.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Sequence, Tuple, get_args

import tensorflow as tf

from distclip._src.errors import ArgumentError, ContextError
from distclip._src.sync import horovod, mpi
from distclip._src.sync.base import MEAN, SUM, Backend
from distclip._src.sync.horovod import HorovodBackend
from distclip._src.sync.local import LocalBackend
from distclip._src.sync.mpi import MPIBackend
from distclip._src.sync.tf_distribute import TFDistributeBackend
from distclip._src.variables import tf_variable

BackendName = Literal["auto", "tf_distribute", "horovod", "none"]
Reduction = Literal["auto", "sum", "mean"]
BACKENDS: Tuple[str, ...] = get_args(BackendName)
REDUCTIONS: Tuple[str, ...] = get_args(Reduction)

__all__ = ["Backend", "BackendName", "Reduction", "BACKENDS", "REDUCTIONS", "SUM", "MEAN", "current", "select",
           "resolve_reduction", "replicas", "check_replica_context", "broadcast_from_root"]


def _strategy(variables: Sequence[Any]) -> Optional[tf.distribute.Strategy]:
    """The strategy that holds `variables` (mirrored ones), else the one in scope, else None."""
    for v in variables:
        value = tf_variable(v)
        if isinstance(value, tf.distribute.DistributedValues):
            return value.distribute_strategy
    return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None


def current(variables: Sequence[Any] = ()) -> Backend:
    """The backend that keeps this process's replicas identical (see the module docstring)."""
    strategy = _strategy(variables)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        return TFDistributeBackend(strategy)
    if horovod.active():
        return HorovodBackend()
    if mpi.active():
        return MPIBackend()
    return LocalBackend()


def check_replica_context(caller: str) -> tf.distribute.ReplicaContext:
    """The current replica context; raises `ContextError` in a cross-replica context."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        strategy = tf.distribute.get_strategy()
        raise ContextError(
            f"{caller} was called in a cross-replica context (under {type(strategy).__name__}.scope() "
            "but outside strategy.run). It synchronizes gradients across replicas, so call it inside "
            "the replica function: strategy.run(step_fn, args=...)."
        )
    return ctx


def select(backend: str) -> Backend:
    """The backend for the gradients of this replica context; `backend` is one of `BACKENDS`."""
    if backend == "auto":
        return current()
    if backend == "none":
        return LocalBackend()
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync if tf.distribute.has_strategy() else 1
    if backend == "horovod":
        if replicas > 1:
            raise ContextError(
                f"backend='horovod' inside a {type(tf.distribute.get_strategy()).__name__} with "
                f"{replicas} replicas: use one backend, Horovod (one replica per process) or tf.distribute"
            )
        return HorovodBackend()
    if not tf.distribute.has_strategy():
        raise ContextError("backend='tf_distribute' needs a tf.distribute strategy: call distclip inside strategy.run")
    return TFDistributeBackend(tf.distribute.get_strategy())


def replicas(backend: str) -> int:
    """How many replicas `select(backend)` would synchronize, from a replica or the cross-replica context."""
    if backend == "none":
        return 1
    if backend == "auto":
        return current().num_replicas()
    if backend == "horovod":
        return HorovodBackend().num_replicas()
    return tf.distribute.get_strategy().num_replicas_in_sync


def broadcast_from_root(variables: Iterable[Any], root: int = 0) -> None:
    """Makes every replica's `variables` equal to those of rank `root` (model and optimizer, at the start).

    Under Horovod this broadcasts them (`hvd.broadcast_variables`), and in an
    MPI world with mpi4py. Under tf.distribute it does nothing: the strategy
    already creates mirrored variables identical on every replica
    (MultiWorkerMirroredStrategy broadcasts initial values from worker 0). Call
    it after the optimizer is built (`optimizer.build(model.trainable_variables)`),
    so its slots are included.

    Args:
      variables: Keras or TensorFlow variables, in the same order on every process.
      root: the rank whose values every process takes.

    Raises:
      ArgumentError: `root` is not a rank of this job.
    """
    if isinstance(root, bool) or not isinstance(root, int) or root < 0:
        raise ArgumentError(f"root must be a non-negative process rank; got root={root!r}")
    variables = list(variables)
    backend = current(variables)
    if root >= backend.size():
        raise ArgumentError(f"root={root} but {backend.name} has {backend.size()} processes")
    backend.broadcast(variables, root)


def resolve_reduction(reduction: str, backend: Backend) -> str:
    """`SUM` or `MEAN` (`reduction` is one of `REDUCTIONS`, already checked)."""
    return backend.default_reduction if reduction == "auto" else reduction
