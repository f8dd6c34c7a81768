"""The configuration of `distclip train` (no TensorFlow import, so `distclip --help` is fast)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple


@dataclass
class Config:
    strategy: str = "auto"
    replicas: int = 2
    clip_norm: Optional[float] = 1.0
    steps: int = 10000
    batch_size: int = 64
    length: int = 50
    units: int = 64
    recurrent_gain: float = 1.0
    learning_rate: float = 0.01
    seed: int = 0
    out: str = "runs/adding"
    fit: bool = False
    checkpoint_every: int = 1000  # steps between checkpoints; 0: only on SIGTERM and at the end
    resume: bool = False
    variable_norms_every: int = 0  # write per-layer norms every N steps; 0: never
    noise_scale: bool = False  # estimate the gradient noise scale (B_simple)
    nan_at: Tuple[int, ...] = ()  # steps at which the last replica's batch gets a NaN (to see attribution)
    rewind: Tuple[int, ...] = ()  # (every, keep, skip): rewind on a spike (distclip.Rewind); (): never
    rewind_factor: float = 20.0  # a spike: norm or loss above this many times their mean over the window (the
    # adding RNN's norm alone reaches 11 times its 50-step mean, clipped and harmless)
    rewind_window: int = 50  # applied steps the mean is taken over
    spike_at: Tuple[int, ...] = ()  # steps whose targets are multiplied by 100 (to see a rewind)

    def rewind_config(self) -> Any:
        """The `distclip.Rewind` of `--rewind` (None without)."""
        if not self.rewind:
            return None
        from distclip._src.rewind import Rewind

        every, keep, skip = self.rewind
        return Rewind(every=every, keep=keep, skip=skip, factor=self.rewind_factor, window=self.rewind_window)

    @property
    def nonfinite(self) -> Literal["skip", "propagate"]:
        """Without clipping the run is plain SGD (a non-finite step applies NaN, as it would); with it, skipped."""
        return "propagate" if self.clip_norm is None else "skip"
