"""distclip: clip gradients by their global L2 norm after the cross-replica all-reduce.

    result = distclip.sync_and_clip(grads, clip_norm=1.0)      # inside strategy.run
    step = distclip.ClipStep(optimizer, clip_norm=1.0)          # under strategy.scope()
    result = step.apply(grads, model.trainable_variables)       # inside strategy.run
    reporter = distclip.ClipReporter(step, model.trainable_variables, log_dir="run")  # then report() per step
    model.compile(optimizer=distclip.keras.ClipOptimizer(optimizer, clip_norm=1.0), ...)

The public API is what `distclip`, `distclip.keras` and `distclip.cluster`
export (their `__all__`), the `distclip` command, and the
`python -m distclip.cluster.launcher | watchdog | netns` commands that
`launch/` and `slurm/` run. Everything under `distclip._src` is internal and
may move between releases. Layers, each importing only those before it:
  * the core, `distclip._src` (`clip`, `update`, `optimizer`, ...), with
    `distclip._src.sync` (one backend per way of keeping replicas identical);
  * `distclip.keras` (`distclip._src.keras`): `ClipOptimizer` and its callbacks, for `model.fit`;
  * `distclip.cluster`: running on a cluster (launcher env, strategies,
    `verify_replicas`, the launcher, the watchdog);
  * `distclip.train`: the example application (`distclip train`), never imported by the library.

Names are imported on first use, so `python -m distclip.cluster.launcher` and
`distclip --help` start without loading TensorFlow; importing distclip changes
nothing outside it.
"""
from importlib import import_module
from typing import TYPE_CHECKING, Any, List

__version__ = "0.2.0"

_EXPORTS = {
    "sync_and_clip": "distclip._src.clip",
    "ClipStep": "distclip._src.step",
    "ClipResult": "distclip._src.clip",
    "ClipReporter": "distclip._src.reporter",
    "NonfiniteUpdate": "distclip._src.attribution",
    "ReplicaPlace": "distclip._src.attribution",
    "broadcast_from_root": "distclip._src.sync",
    "verify_replicas": "distclip.cluster.verify",
    "ReplicaMismatchError": "distclip.cluster.verify",
    "ArgumentError": "distclip._src.errors",
    "ContextError": "distclip._src.errors",
    "AGC": "distclip._src.agc",
    "ClipGroups": "distclip._src.groups",
    "VariableGroup": "distclip._src.groups",
    "AutoClip": "distclip._src.policies",
    "SpikeClip": "distclip._src.policies",
    "ZClip": "distclip._src.policies",
    "NoiseScale": "distclip._src.noise",
    "NoiseEstimate": "distclip._src.noise",
    "Rewind": "distclip._src.rewind",
    "SkipSpikes": "distclip._src.rewind",
    "RewindEvent": "distclip._src.rewind",
    "RewindLimitError": "distclip._src.rewind",
}
__all__ = sorted(_EXPORTS) + ["cluster", "keras", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from distclip import cluster, keras  # noqa: F401
    from distclip._src.attribution import NonfiniteUpdate, ReplicaPlace  # noqa: F401
    from distclip._src.agc import AGC  # noqa: F401
    from distclip._src.clip import ClipResult, sync_and_clip  # noqa: F401
    from distclip._src.errors import ArgumentError, ContextError  # noqa: F401
    from distclip._src.groups import ClipGroups, VariableGroup  # noqa: F401
    from distclip._src.noise import NoiseEstimate, NoiseScale  # noqa: F401
    from distclip._src.policies import AutoClip, SpikeClip, ZClip  # noqa: F401
    from distclip._src.reporter import ClipReporter  # noqa: F401
    from distclip._src.rewind import Rewind, RewindEvent, RewindLimitError, SkipSpikes  # noqa: F401
    from distclip._src.step import ClipStep  # noqa: F401
    from distclip._src.sync import broadcast_from_root  # noqa: F401
    from distclip.cluster.verify import ReplicaMismatchError, verify_replicas  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in ("cluster", "keras"):
        return import_module(f"distclip.{name}")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distclip' has no attribute {name!r}")


def __dir__() -> List[str]:
    return __all__
