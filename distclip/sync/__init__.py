"""How gradients are synchronized: one small backend per engine, picked here.

`select(backend, ctx)` returns the engine for the replica context `ctx`:
  * "tf_distribute": inside `strategy.run` of a strategy with more than one
    replica in sync (MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy);
  * "horovod": each process one replica, under an initialized Horovod;
  * "none": a single replica (no strategy, the default strategy,
    `OneDeviceStrategy`), or gradients the caller already synchronized;
  * "auto" (the default): "tf_distribute" in a multi-replica strategy, else
    "horovod" if Horovod is initialized with more than one process, else "none".
"""
from __future__ import annotations

import tensorflow as tf

from distclip.errors import ArgumentError, ContextError
from distclip.sync import horovod
from distclip.sync.base import MEAN, SUM, Backend
from distclip.sync.horovod import HorovodBackend
from distclip.sync.local import LocalBackend
from distclip.sync.tf_distribute import TFDistributeBackend

BACKENDS = ("auto", "tf_distribute", "horovod", "none")
REDUCTIONS = ("auto", SUM, MEAN)

__all__ = ["Backend", "BACKENDS", "REDUCTIONS", "SUM", "MEAN", "select", "resolve_reduction", "check_replica_context",
           "broadcast_from_root"]


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


def select(backend: str, ctx: tf.distribute.ReplicaContext) -> Backend:
    """The backend for replica context `ctx` (see `check_replica_context`); `backend` is one of `BACKENDS`."""
    if backend == "none":
        return LocalBackend()
    if backend == "horovod":
        if tf.distribute.has_strategy() and ctx.num_replicas_in_sync > 1:
            raise ContextError(
                f"backend='horovod' inside a {type(tf.distribute.get_strategy()).__name__} with "
                f"{ctx.num_replicas_in_sync} replicas: use one engine, Horovod (one replica per process) "
                "or tf.distribute"
            )
        return HorovodBackend()
    if backend == "tf_distribute":
        if not tf.distribute.has_strategy():
            raise ContextError(
                "backend='tf_distribute' needs a tf.distribute strategy: call distclip inside strategy.run"
            )
        return TFDistributeBackend(ctx)
    if tf.distribute.has_strategy() and ctx.num_replicas_in_sync > 1:
        return TFDistributeBackend(ctx)
    if horovod.active():
        return HorovodBackend()
    return LocalBackend()


def broadcast_from_root(variables, root: int = 0) -> None:
    """Makes every replica's `variables` equal to those of rank `root` (model and optimizer, at the start).

    Under Horovod this broadcasts them (`hvd.broadcast_variables`). Under
    tf.distribute it does nothing: the strategy already creates mirrored
    variables identical on every replica (MultiWorkerMirroredStrategy
    broadcasts initial values from worker 0). Call it after the optimizer is
    built (`optimizer.build(model.trainable_variables)`), so its slots are included.
    """
    if isinstance(root, bool) or not isinstance(root, int) or root < 0:
        raise ArgumentError(f"root must be a non-negative process rank; got root={root!r}")
    variables = list(variables)
    if horovod.active():
        backend = HorovodBackend()
        if root >= backend.num_replicas():
            raise ArgumentError(f"root={root} but Horovod has {backend.num_replicas()} processes")
        backend.broadcast(variables, root)


def resolve_reduction(reduction: str, backend: Backend) -> str:
    """`SUM` or `MEAN` (`reduction` is one of `REDUCTIONS`, already checked)."""
    return backend.default_reduction if reduction == "auto" else reduction
