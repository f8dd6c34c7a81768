"""distclip: clip gradients by their global L2 norm after the cross-replica all-reduce.

    result = distclip.sync_and_clip(grads, clip_norm=1.0)      # inside strategy.run
    step = distclip.ClipStep(optimizer, clip_norm=1.0)          # under strategy.scope()
    result = step.apply(grads, model.trainable_variables)       # inside strategy.run
"""
from distclip.clip import sync_and_clip
from distclip.errors import ArgumentError, ContextError
from distclip.result import ClipResult
from distclip.step import ClipStep
from distclip.sync import broadcast_from_root
from distclip.verify import ReplicaMismatchError, verify_replicas
from distclip import cluster

__version__ = "0.1.0"

__all__ = ["sync_and_clip", "ClipStep", "ClipResult", "broadcast_from_root", "verify_replicas", "cluster",
           "ArgumentError", "ContextError", "ReplicaMismatchError", "__version__"]
