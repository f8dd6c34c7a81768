"""Keras 3 integration: `ClipOptimizer` for `model.compile`/`model.fit`, and its callbacks.

Importing it changes nothing in Keras. `fix_multiworker_fit()` is Keras's
`fit` under MultiWorkerMirroredStrategy made to work (keras-team/keras#20585),
which `ClipOptimizer` applies itself when created under such a strategy.
"""
from distclip._src.keras.callbacks import BroadcastCallback, ClipLogger
from distclip._src.keras.multiworker_fit import fix_multiworker_fit
from distclip._src.keras.optimizer import ClipOptimizer

__all__ = ["ClipOptimizer", "BroadcastCallback", "ClipLogger", "fix_multiworker_fit"]
