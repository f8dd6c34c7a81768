"""Keras 3 integration: `ClipOptimizer` for `model.compile`/`model.fit`, and its callbacks."""
from distclip.keras.callbacks import BroadcastCallback, ClipLogger
from distclip.keras.optimizer import ClipOptimizer

__all__ = ["ClipOptimizer", "BroadcastCallback", "ClipLogger"]
