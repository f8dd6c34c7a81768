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

`fix_multiworker_fit()` wraps both, once (idempotent), where the installed Keras is a
release known to fail (`FAILING`, by version number, so that a reformatted
Keras cannot turn it off silently): the wrappers change nothing unless the
strategy is a MultiWorkerMirroredStrategy in multi-worker mode. Importing
distclip changes nothing in Keras: `ClipOptimizer` installs it when it is
created under a multi-worker MultiWorkerMirroredStrategy, and
`distclip.keras.fix_multiworker_fit()` installs it for a `fit` without
`ClipOptimizer`. `DISTCLIP_KERAS_MWMS_FIX=0` turns it off, `=1` installs it
on any Keras 3 (for a newer release that still fails).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import keras

from distclip._src import internals

ENV = "DISTCLIP_KERAS_MWMS_FIX"
#: Keras releases whose trainer fails under multi-worker MultiWorkerMirroredStrategy, [first, past last):
#: 3.0 up to 3.15.1, the newest release (keras-team/keras#20585 is open). A test notices when it is fixed.
FAILING = ((3, 0), (3, 16))
_MARK = "_distclip_mwms_fix"
_log = logging.getLogger(__name__)


def _keras_fails() -> bool:
    version = tuple(int(part) for part in keras.version().split(".")[:2])
    return FAILING[0] <= version < FAILING[1]


def installed() -> bool:
    """Whether Keras's trainer is wrapped (both places)."""
    return all(getattr(f, _MARK, False) for f in internals.trainer_functions())


def fix_multiworker_fit() -> bool:
    """Fixes Keras's `fit`, `evaluate` and `predict` under multi-worker MultiWorkerMirroredStrategy.

    Wraps two functions of Keras's TensorFlow trainer, once, where the
    installed Keras is a release known to fail (see the module docstring);
    every other strategy runs Keras's own code unchanged. Call it before
    `model.fit` (`ClipOptimizer` calls it itself when created under such a strategy).

    Returns:
      Whether the fix is installed.
    """
    setting = os.environ.get(ENV)
    if setting == "0" or (setting != "1" and not _keras_fails()):
        return False
    build, reduce = internals.trainer_functions()
    wrapped = [not getattr(f, _MARK, False) for f in (build, reduce)]
    internals.replace_trainer_functions(_local_symbolic_build(build) if wrapped[0] else build,
                                        _mean_across_replicas(reduce) if wrapped[1] else reduce)
    if any(wrapped):
        _log.info("Keras's fit under MultiWorkerMirroredStrategy fixed (keras-team/keras#20585; %s=0 turns this off)",
                  ENV)
    return True


def install_under(strategy: Any) -> None:
    """`fix_multiworker_fit()` if `strategy` is a MultiWorkerMirroredStrategy in multi-worker mode."""
    if internals.in_multi_worker_mode(strategy):
        fix_multiworker_fit()


def _local_symbolic_build(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = internals.trainer_strategy(self)
        if iterator is None or strategy is None or not internals.in_multi_worker_mode(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        for _, _, it in iterator:
            batch = next(it)
            data_batch = keras.tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            internals.symbolic_build(self, data_batch)

    setattr(_maybe_symbolic_build, _MARK, True)
    return _maybe_symbolic_build


def _mean_across_replicas(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not internals.in_multi_worker_mode(strategy):
            return original(values, strategy, reduction)
        return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    setattr(reduce_per_replica, _MARK, True)
    return reduce_per_replica
