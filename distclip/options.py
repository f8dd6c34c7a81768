"""`StepOptions`: how a clip step synchronizes and what it does with a non-finite norm, checked once."""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, TypeVar, Union

from distclip import sync
from distclip.errors import ArgumentError
from distclip.sync.wire import COMPRESSIONS


@dataclass(frozen=True)
class StepOptions:
    """The options `sync_and_clip`, `ClipStep` and `distclip.keras.ClipOptimizer` share.

    Checked when created (each error names the argument and its value), then
    passed whole and never checked again.

    Fields:
      nonfinite: what a step does when the synchronized global norm is inf or
        NaN: "skip" (every replica skips it together), "raise" (the step fails),
        "propagate" (NaN gradients, as `tf.clip_by_global_norm`).
      reduction: "auto" (SUM under tf.distribute, MEAN under Horovod), "sum" or "mean".
      backend: "auto", "tf_distribute", "horovod" or "none" (see `distclip.sync`).
      sparse_as_dense: send `tf.IndexedSlices` dense in the packed all-reduce.
      compression: None, "none" or "fp16" (see `distclip.sync.wire`).
      accumulation_steps: k >= 1 micro-batches per update (see `distclip.accumulate`).
      bucket_mb: "auto" (the engine's default: buckets of 25 MB under Horovod, one
        packed all-reduce under tf.distribute), None (one packed all-reduce), or
        buckets of at most this many megabytes sent last layers first as they
        are ready (see `distclip.sync.buckets`).
    """

    NONFINITE: ClassVar[Tuple[str, ...]] = ("skip", "raise", "propagate")
    REDUCTIONS: ClassVar[Tuple[str, ...]] = sync.REDUCTIONS
    BACKENDS: ClassVar[Tuple[str, ...]] = sync.BACKENDS
    COMPRESSIONS: ClassVar[Tuple[Optional[str], ...]] = COMPRESSIONS

    nonfinite: str = "skip"
    reduction: str = "auto"
    backend: str = "auto"
    sparse_as_dense: bool = False
    compression: Optional[str] = None
    accumulation_steps: int = 1
    bucket_mb: Union[None, float, str] = "auto"

    def __post_init__(self) -> None:
        _choice("nonfinite", self.nonfinite, self.NONFINITE)
        _choice("reduction", self.reduction, self.REDUCTIONS)
        _choice("backend", self.backend, self.BACKENDS)
        if not isinstance(self.sparse_as_dense, bool):
            raise ArgumentError(f"sparse_as_dense must be True or False; got sparse_as_dense={self.sparse_as_dense!r}")
        if self.compression not in self.COMPRESSIONS:
            raise ArgumentError(f"compression must be one of {self.COMPRESSIONS}; got compression={self.compression!r}")
        steps = self.accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ArgumentError(f"accumulation_steps must be an integer >= 1; got accumulation_steps={steps!r}")
        object.__setattr__(self, "accumulation_steps", int(steps))
        mb = self.bucket_mb
        if mb not in (None, "auto") and (isinstance(mb, (bool, str)) or not isinstance(mb, numbers.Real)
                                         or not math.isfinite(mb) or mb <= 0):
            raise ArgumentError(f"bucket_mb must be 'auto', None or a positive number of megabytes; got bucket_mb={mb!r}")

    @classmethod
    def from_keywords(cls, owner: str, options: Dict[str, Any]) -> "StepOptions":
        """The options `owner` was given as keyword arguments; an unknown keyword is an `ArgumentError`."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise ArgumentError(f"{owner} got an unexpected keyword argument {unknown[0]!r}; "
                                f"its options are {[f.name for f in fields(cls)]} and name")
        return cls(**options)

    def as_dict(self) -> Dict[str, Any]:
        """The options as keyword arguments (for `get_config`)."""
        return asdict(self)


Init = TypeVar("Init", bound=Callable[..., None])


def takes_step_options(init: Init) -> Init:
    """Declares `init(self, ..., **options)` with one keyword-only parameter per `StepOptions` field.

    `ClipStep` and `ClipOptimizer` take the same options; their signatures
    (`help`, `inspect.signature`) show them from this one definition.
    """
    sig = inspect.signature(init)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(StepOptions)]
    init.__signature__ = sig.replace(parameters=params)
    return init


class WithStepOptions:
    """The options of a clip step as read-only attributes (`step.nonfinite`, ...), from `self.options`."""

    options: StepOptions


for _field in fields(StepOptions):
    setattr(WithStepOptions, _field.name, property(lambda self, _name=_field.name: getattr(self.options, _name)))


def _choice(name: str, value: Any, choices: Tuple[Any, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {tuple(choices)}; got {name}={value!r}")
