"""`StepOptions`: how a clip step synchronizes and what it does with a non-finite norm, checked once."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Literal, Tuple, Union

from distclip._src.checks import check_integer, check_number
from distclip._src.errors import ArgumentError
from distclip._src.nonfinite import NONFINITE, Nonfinite
from distclip._src.sync import BACKENDS, REDUCTIONS, BackendName, Reduction
from distclip._src.sync.wire import COMPRESSIONS, Compression

BucketMB = Union[None, float, Literal["auto"]]


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """The options `sync_and_clip`, `ClipStep` and `ClipOptimizer` take, each documented where it is taken.

    Checked when created (each error names the argument and its value), then
    passed whole and never checked again.
    """

    nonfinite: Nonfinite = "skip"
    reduction: Reduction = "auto"
    backend: BackendName = "auto"
    sparse_as_dense: bool = False
    compression: Compression = None
    accumulation_steps: int = 1
    bucket_mb: BucketMB = "auto"
    variable_norms: bool = False

    def __post_init__(self) -> None:
        _choice("nonfinite", self.nonfinite, NONFINITE)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("backend", self.backend, BACKENDS)
        if not isinstance(self.sparse_as_dense, bool):
            raise ArgumentError(f"sparse_as_dense must be True or False; got sparse_as_dense={self.sparse_as_dense!r}")
        if self.compression not in COMPRESSIONS:
            raise ArgumentError(f"compression must be one of {COMPRESSIONS}; got compression={self.compression!r}")
        if not isinstance(self.variable_norms, bool):
            raise ArgumentError(f"variable_norms must be True or False; got variable_norms={self.variable_norms!r}")
        check_integer("accumulation_steps", self.accumulation_steps, 1, 2 ** 31 - 1)
        object.__setattr__(self, "accumulation_steps", int(self.accumulation_steps))
        if self.bucket_mb not in (None, "auto"):
            check_number("bucket_mb", self.bucket_mb, 0, rule="'auto', None or a positive number of megabytes")

    def as_dict(self) -> Dict[str, Any]:
        """The options as keyword arguments (for `get_config`)."""
        return asdict(self)


def _choice(name: str, value: Any, choices: Tuple[Any, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {tuple(choices)}; got {name}={value!r}")
