"""`StepBase`: what `ClipStep` and `distclip.keras.ClipOptimizer` share, the one declaration of their options.

As Keras splits `base_optimizer.py` from `backend/tensorflow/optimizer.py`:
the options, their checks and what the latest update saw are here once;
`distclip._src.step` (a `tf.Module`) and `distclip._src.keras.optimizer` (a
Keras optimizer) each add how they start and where their state lives.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import keras

from distclip._src.agc import AGC
from distclip._src.noise import NoiseEstimate, NoiseScale
from distclip._src.nonfinite import Nonfinite
from distclip._src.options import BucketMB, StepOptions
from distclip._src.rewind import Rewind, RewindEvent, SkipSpikes
from distclip._src.sync import BackendName, Reduction
from distclip._src.sync.wire import Compression
from distclip._src.threshold import ClipNorm
from distclip._src.update import ClipUpdate


class StepBase:
    """What `ClipStep` and `ClipOptimizer` share: their options, declared once, and what the latest update saw.

    Each engine gives two things: `_start`, its own `__init__` (a `tf.Module`'s, a Keras optimizer's), and
    `_create_update`, the `ClipUpdate` whose state is kept in its own kind of variables.
    """

    def __init__(self, optimizer: Union[keras.optimizers.Optimizer, Dict[str, Any]], clip_norm: ClipNorm, *,
                 nonfinite: Nonfinite = "skip", reduction: Reduction = "auto", backend: BackendName = "auto",
                 sparse_as_dense: bool = False, compression: Compression = None, accumulation_steps: int = 1,
                 bucket_mb: BucketMB = "auto", variable_norms: bool = False,
                 noise_scale: Optional[NoiseScale] = None, rewind: Optional[Rewind] = None,
                 agc: Optional[AGC] = None, skip_spikes: Optional[SkipSpikes] = None,
                 name: Optional[str] = None) -> None:
        """Checks the options, starts the engine's object, then makes the update and its state.

        The arguments are documented once, on `distclip.ClipStep` (`ClipOptimizer` adds a dict `optimizer`).
        """
        options = StepOptions(nonfinite=nonfinite, reduction=reduction, backend=backend,
                              sparse_as_dense=sparse_as_dense, compression=compression,
                              accumulation_steps=accumulation_steps, bucket_mb=bucket_mb,
                              variable_norms=variable_norms)
        optimizer = self._start(optimizer, name)
        self.options = options
        self.clip_norm = clip_norm
        self.noise_scale = noise_scale
        self.rewind = rewind
        self.agc = agc
        self.skip_spikes = skip_spikes
        self._update = self._create_update(optimizer)

    def _start(self, optimizer: Any, name: Optional[str]) -> Any:
        """The engine's own `__init__`; returns the optimizer that takes the steps."""
        raise NotImplementedError

    def _create_update(self, optimizer: Any) -> ClipUpdate:
        """The `ClipUpdate` for `optimizer` with this object's options, its state in the engine's variables."""
        raise NotImplementedError

    @property
    def global_norm(self) -> Any:
        """The latest update's float32 variable: the synchronized global norm, before clipping."""
        return self._update.state.global_norm

    @property
    def clip_norm_used(self) -> Any:
        """The latest update's float32 variable: the threshold it used (inf for `clip_norm=None`)."""
        return self._update.state.threshold_used

    @property
    def clip_scale(self) -> Any:
        """The latest update's float32 variable: the scale applied, `min(1, clip_norm / global_norm)`."""
        return self._update.state.clip_scale

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches accumulated since the latest update (always 0 without accumulation).

        Take checkpoints when it is 0: between updates each replica holds its own
        partial sums, and a checkpoint then raises.
        """
        return self._update.pending_micro_batches

    @property
    def applies_next(self) -> bool:
        """Whether the next `apply` call takes an update (always True without accumulation)."""
        return self._update.applies_next

    @property
    def nonfinite_replicas(self) -> Any:
        """The latest update's int64 `[num_replicas]` variable: 1 where that replica's own gradients held an inf
        or a NaN (None before the first `apply` or `build`)."""
        return self._update.state.nonfinite_replicas

    @property
    def nonfinite_variables(self) -> Any:
        """The latest update's int64 `[len(variables)]` variable: 1 where that variable's synchronized gradient
        held an inf or a NaN (None before the first `apply` or `build`)."""
        return self._update.state.nonfinite_variables

    @property
    def variable_norms(self) -> Any:
        """The latest update's float32 `[len(variables)]` variable of per-variable norms, with
        `variable_norms=True` (else None)."""
        return self._update.state.variable_norms

    @property
    def rewinds(self) -> Any:
        """The int64 variable counting rewinds since the start, with `rewind` (else None)."""
        rewinding = self._update.rewinding
        return None if rewinding is None or not rewinding.rewinds_on_spike else rewinding.rewinds

    @property
    def rewind_skipped_steps(self) -> Any:
        """The int64 variable counting the updates a rewind did not learn from (the spike's and the ones skipped
        after it), with `rewind` (else None)."""
        rewinding = self._update.rewinding
        return None if rewinding is None or not rewinding.rewinds_on_spike else rewinding.skipped

    @property
    def skipped_spikes(self) -> Any:
        """The int64 variable counting the updates skipped as spikes, with `skip_spikes` (else None)."""
        rewinding = self._update.rewinding
        return None if rewinding is None or rewinding.rewinds_on_spike else rewinding.skipped

    def latest_rewind(self) -> Optional[RewindEvent]:
        """The latest rewind (read eagerly), or None before the first or without `rewind`.

        Returns:
          A `distclip.RewindEvent`, in updates counted from 1 since the start, or None.
        """
        rewinding = self._update.rewinding
        return None if rewinding is None else rewinding.latest_event()

    def check_rewind_limit(self, save: Optional[Callable[[], Optional[str]]] = None) -> None:
        """Raises `distclip.RewindLimitError` once the rewind limit was hit; call it between steps.

        The step's variables then hold the last good snapshot; `save()` is
        called first (write a checkpoint there and return its path). One
        scalar is read from the device.

        Args:
          save: writes the last good state to disk and returns the path it wrote (None from a process whose
            copy is not kept, such as a MultiWorkerMirroredStrategy worker other than the chief); or None.

        Raises:
          RewindLimitError: the limit was hit (the message names the updates and the path).
        """
        if self._update.rewinding is not None:
            self._update.rewinding.check_limit(save)

    @property
    def noise(self) -> Optional[NoiseEstimate]:
        """The gradient noise scale estimates as of the latest update, with a `noise_scale` (else None)."""
        noise = self._update.state.noise
        return None if noise is None else noise.latest()
