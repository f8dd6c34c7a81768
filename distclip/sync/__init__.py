"""How gradients are synchronized: one small backend per engine, picked here.

`select(backend)` returns the engine for the calling context:
  * "tf_distribute": inside `strategy.run` of a strategy with more than one
    replica in sync (MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy);
  * "none": a single replica (no strategy, the default strategy,
    `OneDeviceStrategy`), or gradients the caller already synchronized;
  * "auto" (the default): whichever of the above fits the context.
"""
from __future__ import annotations

import tensorflow as tf

from distclip.errors import ArgumentError, ContextError
from distclip.sync.base import MEAN, SUM, Backend
from distclip.sync.local import LocalBackend
from distclip.sync.tf_distribute import TFDistributeBackend

BACKENDS = ("auto", "tf_distribute", "none")
REDUCTIONS = ("auto", SUM, MEAN)

__all__ = ["Backend", "BACKENDS", "REDUCTIONS", "SUM", "MEAN", "select", "resolve_reduction", "check_replica_context"]


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


def select(backend: str = "auto", caller: str = "sync_and_clip") -> Backend:
    if backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {BACKENDS}; got backend={backend!r}")
    ctx = check_replica_context(caller)
    if backend == "none":
        return LocalBackend()
    if backend == "tf_distribute":
        if not tf.distribute.has_strategy():
            raise ContextError(
                f"backend='tf_distribute' needs a tf.distribute strategy: call {caller} inside strategy.run"
            )
        return TFDistributeBackend(ctx)
    if tf.distribute.has_strategy() and ctx.num_replicas_in_sync > 1:
        return TFDistributeBackend(ctx)
    return LocalBackend()


def resolve_reduction(reduction: str, backend: Backend) -> str:
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction must be one of {REDUCTIONS}; got reduction={reduction!r}")
    return backend.default_reduction if reduction == "auto" else reduction
