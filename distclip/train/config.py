"""The configuration of `distclip train` (no TensorFlow import, so `distclip --help` is fast)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

#: The threshold policies `--clip-norm` takes by name: the `distclip` class of each, made with its defaults.
POLICIES = {"autoclip": "AutoClip", "spikeclip": "SpikeClip", "zclip": "ZClip"}


@dataclass
class Config:
    strategy: str = "auto"
    replicas: int = 2
    clip_norm: Union[float, str, None] = 1.0  # a threshold, None (no clipping), or a name in POLICIES
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
    move_aside: bool = False  # a new run moves an earlier run's outputs in OUT into OUT/aside-N/
    variable_norms_every: int = 0  # write per-layer norms every N steps; 0: never
    noise_scale: bool = False  # estimate the gradient noise scale (B_simple)
    nan_at: Tuple[int, ...] = ()  # steps at which the last replica's batch gets a NaN (to see attribution)
    rewind: Tuple[int, ...] = ()  # (every, keep, skip): rewind on a spike (distclip.Rewind); (): never
    rewind_factor: float = 20.0  # a spike: norm or loss above this many times their mean over the window (the
    # adding RNN's norm alone reaches 11 times its 50-step mean, clipped and harmless)
    rewind_window: int = 50  # applied steps the mean is taken over
    rewind_lr: Tuple[float, ...] = ()  # (factor, updates): the learning rate after a rewind (Rewind.lr_factor)
    rewind_reset_moments: bool = False  # SGD's momentum set to zero after a rewind (Rewind.reset_moments)
    spike_at: Tuple[int, ...] = ()  # steps whose targets are multiplied by 100 (to see a rewind)
    skip_spikes: Tuple[float, ...] = ()  # (zscore, window): skip a spike (distclip.SkipSpikes); (): never
    agc: Optional[float] = None  # AGC's clipping (lambda): unit-wise clipping before the global clip; None: off
    clip_group: Tuple[Tuple[str, float], ...] = ()  # (pattern, threshold) per group; clip_norm: the rest's

    def threshold(self) -> Any:
        """The step's `clip_norm`: the number, None, or the named `distclip` policy with its defaults; with
        `clip_group`, a `distclip.ClipGroups` of one group per pattern (named by it) and `clip_norm` the
        threshold of the variables no pattern matches (no global threshold on top)."""
        import distclip

        if self.clip_group:
            return distclip.ClipGroups([distclip.VariableGroup(pattern, threshold, patterns=[pattern])
                                        for pattern, threshold in self.clip_group], default=self.clip_norm)
        if not isinstance(self.clip_norm, str):
            return self.clip_norm
        return getattr(distclip, POLICIES[self.clip_norm])()

    def agc_config(self) -> Any:
        """The `distclip.AGC` of `--agc` (None without)."""
        if self.agc is None:
            return None
        import distclip

        return distclip.AGC(clipping=self.agc)

    def rewind_config(self) -> Any:
        """The `distclip.Rewind` of `--rewind` (None without)."""
        if not self.rewind:
            return None
        import distclip

        every, keep, skip = self.rewind
        factor, updates = self.rewind_lr or (None, None)
        return distclip.Rewind(every=every, keep=keep, skip=skip, factor=self.rewind_factor,
                               window=self.rewind_window, lr_factor=factor,
                               lr_updates=None if updates is None else int(updates),
                               reset_moments=self.rewind_reset_moments)

    def skip_spikes_config(self) -> Any:
        """The `distclip.SkipSpikes` of `--skip-spikes` (None without): OLMo-core's two-sided z-score rule."""
        if not self.skip_spikes:
            return None
        import distclip

        zscore, window = self.skip_spikes
        return distclip.SkipSpikes(zscore=zscore, window=int(window))

    @property
    def detects_spikes(self) -> bool:
        """Whether the step has a spike detector (`--rewind` or `--skip-spikes`), which takes the loss too."""
        return bool(self.rewind or self.skip_spikes)

    @property
    def nonfinite(self) -> Literal["skip", "propagate"]:
        """Without clipping (no threshold, no AGC) the run is plain SGD (a non-finite step applies NaN, as it
        would); with it, skipped."""
        return "propagate" if self.clip_norm is None and self.agc is None and not self.clip_group else "skip"


#: What may change between a run and its `--resume`, and why; every other setting must be as the run was
#: started (docs/guide/preemption.md lists the same). A setting missing from an older run's config.json is
#: taken at its default, which is how that older version ran.
MAY_CHANGE = {
    "steps": "how far to train",
    "out": "where the run is (it is the folder being resumed)",
    "strategy": "how the same replicas are placed (the checkpoint is the same under any strategy)",
    "replicas": "the number of replicas (--batch-size stays the global batch)",
    "resume": "the flag itself",
    "move_aside": "what a new run does with an earlier run's outputs (refused with --resume)",
    "checkpoint_every": "how often to checkpoint",
    "variable_norms_every": "what is logged, not what is trained or saved",
}

#: Settings that add state to the checkpoint: they cannot be added or changed on --resume (the checkpoint
#: does not hold their state), so a change is refused with that reason.
ADDS_STATE = {"rewind": "--rewind", "noise_scale": "--noise-scale", "rewind_window": "--rewind-window",
              "skip_spikes": "--skip-spikes", "rewind_lr": "--rewind-lr", "clip_group": "--clip-group"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def changed_on_resume(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """The settings of `now` (as JSON reads them back) that differ from `saved` and may not change, sorted.

    A key `saved` lacks (written by an older distclip) counts as its default.
    """
    defaults: Dict[str, Any] = json.loads(json.dumps(asdict(Config())))  # as saved: a tuple reads back as a list
    old = {k: saved.get(k, defaults[k]) for k in now}
    return sorted(k for k in now if k not in MAY_CHANGE and old[k] != now[k])


def describe_changes(saved: Dict[str, Any], now: Dict[str, Any], keys: List[str]) -> str:
    """Why `keys` (from `changed_on_resume`) refuse the resume, one setting per line."""
    defaults = asdict(Config())

    def show(value: Any) -> str:  # as given on the command line
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value)) if value else "(not set)"
        return str(value)

    lines = []
    for k in keys:
        line = f"  {flag(k)}: the run was started with {show(saved.get(k, defaults[k]))}" + (
            "" if k in saved else " (not in its config.json: an older distclip, which ran with the default)"
        ) + f", this run has {show(now[k])}"
        if k in ADDS_STATE:
            line += (f"; {ADDS_STATE[k]} adds state to the checkpoint that the run being resumed does not hold "
                     "in that shape, so it cannot change on --resume")
        lines.append(line)
    return "\n".join(lines)
