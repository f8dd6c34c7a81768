"""`model.fit`, `evaluate` and `predict` under MultiWorkerMirroredStrategy: two places in Keras 3's trainer.

Keras 3 (3.15.1 and its master of 2026) fails there with any optimizer
(keras-team/keras#20585), in `keras/src/backend/tensorflow/trainer.py`:

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from a first
   batch that it reduces across workers (`strategy.reduce("MEAN", batch)`);
   MultiWorkerMirroredStrategy cannot reduce a nested batch of `PerReplica`
   values ("Attempt to convert a value (PerReplica...) to a Tensor"). The
   build reads only shapes and dtypes, so this process's first replica's
   slice serves, with no collective over the input data.
2. `reduce_per_replica` reduces the step's logs with
   `strategy.reduce("MEAN", v, axis=0)`, which fails on scalar logs ("Invalid
   reduction dimension 0 for input with 0 dimensions"). `axis=None` (a mean
   across replicas) is what the single-worker branch computes.

`install()` wraps both, once (idempotent): the wrappers change nothing unless
the strategy is a MultiWorkerMirroredStrategy in multi-worker mode, and each
is installed only where the installed Keras still has the failing call (read
from its source, not its version number). The first time a wrapper acts it
says so on stderr, once. `DISTCLIP_KERAS_MWMS_FIX=0` turns it all off.
`import distclip.keras` installs it.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys

ENV = "DISTCLIP_KERAS_MWMS_FIX"
_MARK = "_distclip_mwms_fix"
_said = False


def _say_once() -> None:
    global _said
    if not _said:
        _said = True
        print("distclip: Keras's fit under MultiWorkerMirroredStrategy patched (keras-team/keras#20585; "
              f"{ENV}=0 turns this off)", file=sys.stderr, flush=True)


def _multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def _needs(function, failing_call: str) -> bool:
    try:
        return failing_call in "".join(inspect.getsource(function).split())
    except (OSError, TypeError):
        return False


def install() -> bool:
    """Wraps the two places if this Keras has them and the fix is not turned off; returns whether any is wrapped."""
    if os.environ.get(ENV, "1") == "0":
        return False
    from keras.src.backend.tensorflow import trainer

    cls = trainer.TensorFlowTrainer
    if not getattr(cls._maybe_symbolic_build, _MARK, False) and _needs(
            cls._maybe_symbolic_build, "self.distribute_strategy.reduce("):
        cls._maybe_symbolic_build = _local_symbolic_build(cls._maybe_symbolic_build)
    if not getattr(trainer.reduce_per_replica, _MARK, False) and _needs(
            trainer.reduce_per_replica, 'strategy.reduce("MEAN",v,axis=0)'):
        trainer.reduce_per_replica = _mean_across_replicas(trainer.reduce_per_replica)
    return getattr(cls._maybe_symbolic_build, _MARK, False) or getattr(trainer.reduce_per_replica, _MARK, False)


def _local_symbolic_build(original):
    @functools.wraps(original)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not _multi_worker(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        import tensorflow as tf
        from keras.src import tree

        _say_once()
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    setattr(_maybe_symbolic_build, _MARK, True)
    return _maybe_symbolic_build


def _mean_across_replicas(original):
    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not _multi_worker(strategy):
            return original(values, strategy, reduction)
        from keras.src import tree

        _say_once()
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    setattr(reduce_per_replica, _MARK, True)
    return reduce_per_replica
