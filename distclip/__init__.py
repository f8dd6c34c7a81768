"""distclip: clip gradients by their global L2 norm after the cross-replica all-reduce.

    result = distclip.sync_and_clip(grads, clip_norm=1.0)      # inside strategy.run
    step = distclip.ClipStep(optimizer, clip_norm=1.0)          # under strategy.scope()
    result = step.apply(grads, model.trainable_variables)       # inside strategy.run
    model.compile(optimizer=distclip.keras.ClipOptimizer(optimizer, clip_norm=1.0), ...)

Layers, each importing only those before it:
  * the core, here: the step (`engine`, `clip`, `norm`, `threshold`, `policies`,
    `apply`, `lockstep`, `accumulate`, `loss_scale`, `step`, `steplog`) and
    `distclip.sync` (which engine keeps replicas identical; one backend per engine);
  * `distclip.keras`: `ClipOptimizer` and its callbacks, for `model.fit`;
  * `distclip.cluster`: running on a cluster (launcher env, strategies,
    `verify_replicas`, the launcher, the watchdog);
  * `distclip.train`: the example application (`distclip train`), never imported by the library.

Names are imported on first use, so `python -m distclip.cluster.launcher` and
`distclip --help` start without loading TensorFlow.
"""
from importlib import import_module
from typing import TYPE_CHECKING

from distclip import _moved

__version__ = "0.1.0"

_EXPORTS = {
    "sync_and_clip": "distclip.clip",
    "ClipStep": "distclip.step",
    "ClipResult": "distclip.result",
    "broadcast_from_root": "distclip.sync",
    "verify_replicas": "distclip.cluster.verify",
    "ReplicaMismatchError": "distclip.cluster.verify",
    "ArgumentError": "distclip.errors",
    "ContextError": "distclip.errors",
    "AutoClip": "distclip.policies",
    "SpikeClip": "distclip.policies",
}
_moved.install()  # distclip.launcher, distclip.verify, ... still import (see distclip/_moved.py)

__all__ = sorted(_EXPORTS) + ["cluster", "keras", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from distclip import cluster  # noqa: F401
    from distclip.clip import sync_and_clip  # noqa: F401
    from distclip import keras  # noqa: F401
    from distclip.errors import ArgumentError, ContextError  # noqa: F401
    from distclip.policies import AutoClip, SpikeClip  # noqa: F401
    from distclip.result import ClipResult  # noqa: F401
    from distclip.step import ClipStep  # noqa: F401
    from distclip.sync import broadcast_from_root  # noqa: F401
    from distclip.cluster.verify import ReplicaMismatchError, verify_replicas  # noqa: F401


def __getattr__(name: str):
    if name in ("cluster", "keras"):
        return import_module(f"distclip.{name}")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distclip' has no attribute {name!r}")


def __dir__():
    return __all__
