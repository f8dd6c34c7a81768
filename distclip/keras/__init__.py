"""Keras 3 integration: `ClipOptimizer` for `model.compile`/`model.fit`, and its callbacks."""
from distclip.keras.callbacks import BroadcastCallback, ClipLogger
from distclip.keras.optimizer import ClipOptimizer
from distclip.keras import multiworker_fit

multiworker_fit.install()  # Keras's fit under MultiWorkerMirroredStrategy (keras-team/keras#20585); see the module

__all__ = ["ClipOptimizer", "BroadcastCallback", "ClipLogger"]
