"""`ClipReporter`: what a clip step recorded in each update, as the records users read, for any training loop."""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from distclip._src import sync
from distclip._src.attribution import NonfiniteUpdate, replica_places
from distclip._src.checks import check_integer
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.noise import NoiseEstimate
from distclip._src.rewind import RewindEvent
from distclip._src.steplog import StepLog, require_tensorboard
from distclip._src.base import StepBase
from distclip._src.variables import read_value, variable_name

#: What `last_good` may be: a checkpoint to write, or a function that writes one and returns its path.
LastGood = Union[tf.train.Checkpoint, Callable[[], Optional[str]], None]


class GroupRead(NamedTuple):
    """Each group's norm, threshold and scale in the latest update (in the order of `ClipGroups.names`)."""

    norms: List[float]
    clip_norms: List[float]
    scales: List[float]


class _Read(NamedTuple):
    """One update's scalars, read from the step's state in one transfer."""

    updates: int  # applied or skipped since the start (a rewind counts every update it saw)
    skipped_steps: int  # skipped for a non-finite norm
    finite: bool
    rewind_skipped: int  # updates a rewind did not learn from (0 without `rewind`)
    rewinds: int
    latest_rewind: RewindEvent
    global_norm: float
    threshold: float
    scale: float
    loss: float
    noise: Optional[NoiseEstimate]
    groups: Optional[GroupRead]  # with `ClipGroups`


def check_log_options(owner: str, log_dir: Optional[str], first_name: str, first_step: int,
                      variable_norms_every: int) -> None:
    """Raises ArgumentError for a bad first step or `variable_norms_every` (or one without a `log_dir`), and
    ContextError for a `log_dir` without the tensorboard package: before anything is trained."""
    check_integer(first_name, first_step, 0)
    check_integer("variable_norms_every", variable_norms_every, 0)
    if variable_norms_every and log_dir is None:
        raise ArgumentError(f"variable_norms_every={variable_norms_every} writes to a log_dir; got log_dir=None")
    if log_dir is not None:
        require_tensorboard(f"{owner}(log_dir={log_dir!r})")


class ClipReporter:
    """Turns what a clip step recorded in each update into a line, CSV rows and TensorBoard.

    Call `report()` after each call that may have taken an update (a custom
    loop's step, a `fit` batch); it records every update since the previous
    call, and nothing while micro-batches accumulate:

        reporter = distclip.ClipReporter(step, model.trainable_variables, log_dir="run")
        for x, y in dataset:
            loss = train_step(x, y)       # calls step.apply(...) inside strategy.run
            reporter.report(loss=loss)   # a scalar: the loss as the loop reduced it
        reporter.close()

    Per update: `step` (from `first_step`), `loss` (NaN if not given),
    `global_norm` (synchronized, before clipping), `scale`, `clip_norm` (the
    threshold used), `clipped`, `skipped` and `action` (applied, nonfinite,
    skipped, rewound, stopped or spike_skipped), read from the step's state in one small
    transfer; the per-replica and per-variable flags only for a non-finite
    update, the per-variable norms only every `variable_norms_every` updates.
    With `clip_norm=distclip.ClipGroups(...)`, each group's norm (before its
    own clip), threshold and scale in the same transfer, and `clipped` is 1
    also where a group was clipped. Nothing waits inside the traced step.

    On every rank it keeps `nonfinite` (`distclip.NonfiniteUpdate`: the
    replicas, with worker, host and device, and the variables behind a
    non-finite update), `rewinds` (`distclip.RewindEvent`) and
    `clipped_steps`. Rank 0 prints a line for each non-finite update and each
    rewind to stderr ("distclip: step 12 skipped: non-finite gradients from
    replica 1 (worker 0, host node-3, CPU:1) in dense/kernel") and, with
    `log_dir`, writes `metrics.csv`, `nonfinite.csv`, `layer_norms.csv`,
    `rewinds.csv`, `group_norms.csv` and TensorBoard event files under `log_dir/tensorboard`
    (see `distclip._src.steplog`).

    At the rewind limit (`distclip.Rewind.max_rewinds`) `report` saves the
    last good state with `last_good` and raises `distclip.RewindLimitError`
    naming where it went.

    Create it on every process at the same point, after the strategy and the
    variables exist: it all-gathers each replica's host and device once.

    Args:
      step: the `distclip.ClipStep` or `distclip.keras.ClipOptimizer` that takes the updates.
      variables: the trainable variables the step updates, in the order given to `apply` (their names
        label the non-finite variables and the layer norms; they locate the strategy).
      log_dir: the folder for the CSV files and `tensorboard/`, written by rank 0; or None (lines only).
      first_step: the number of the first update recorded (0 to 2**62): for a run resumed from a
        checkpoint taken after that many updates, each CSV file keeps its rows before it and drops the
        rest (0: new files).
      variable_norms_every: N, 1 to 2**62, to write per-layer norms every N updates (needs `log_dir` and a
        step made with `variable_norms=True`), or 0 (never).
      last_good: at the rewind limit, a `tf.train.Checkpoint` written to `log_dir/last_good/ckpt` (a new
        temporary folder without `log_dir`) by rank 0, every rank writing as MultiWorkerMirroredStrategy
        needs (the others' copies are discarded); or a function that saves and returns the path (None
        where another process saves); or None (not saved).

    Raises:
      ArgumentError: a bad argument, named with its value.
      ContextError: a `log_dir` where the tensorboard package is not installed, or `variable_norms_every`
        with a step made without `variable_norms=True`.
    """

    def __init__(self, step: StepBase, variables: Sequence[Any], *, log_dir: Optional[str] = None,
                 first_step: int = 0, variable_norms_every: int = 0, last_good: LastGood = None) -> None:
        if not isinstance(step, StepBase):
            raise ArgumentError(f"step must be a distclip.ClipStep or distclip.keras.ClipOptimizer; got step={step!r}")
        check_log_options("ClipReporter", log_dir, "first_step", first_step, variable_norms_every)
        if variable_norms_every and not step.options.variable_norms:
            raise ContextError(f"variable_norms_every={variable_norms_every} needs a step made with "
                               "variable_norms=True")
        if not (last_good is None or callable(last_good) or isinstance(last_good, tf.train.Checkpoint)):
            raise ArgumentError(f"last_good must be a tf.train.Checkpoint, a function or None; got "
                                f"last_good={last_good!r}")
        self.step = step
        self.log_dir = log_dir
        self.variable_norms_every = variable_norms_every
        self.last_good = last_good
        self._names = [variable_name(v) for v in variables]
        groups = step._update.groups
        self._group_names = [] if groups is None else groups.names
        self._places = replica_places(variables)  # every process, together
        self._rank = sync.current(variables).rank()
        #: The number of the next update recorded.
        self.next_step = first_step
        #: Updates whose norm exceeded the threshold (applied, clipped), on every rank.
        self.clipped_steps = 0
        #: The non-finite updates seen (`distclip.NonfiniteUpdate`), on every rank.
        self.nonfinite: List[NonfiniteUpdate] = []
        #: The rewinds seen (`distclip.RewindEvent`), on every rank.
        self.rewinds: List[RewindEvent] = []
        self._log: Optional[StepLog] = None
        if log_dir is not None and self._rank == 0:
            self._log = StepLog(log_dir, first_step=first_step or None)
            # A resumed run's earlier events, from the files the log kept.
            self.nonfinite, self.rewinds = self._log.earlier_nonfinite(), self._log.earlier_rewinds()
        # Traced once: one call and one small transfer per report (eagerly, some twenty ops and a transfer).
        self._packed = tf.function(self._pack, input_signature=[tf.TensorSpec([], tf.float32)], autograph=False)
        self._no_loss = tf.constant(math.nan, tf.float32)
        # The latest values read: the counters, and the scalars of the latest update.
        self._latest = self._read(None)

    @property
    def rows(self) -> Optional[List[Dict[str, Any]]]:
        """The metrics.csv rows written so far (rank 0 with a `log_dir`), else None."""
        return self._log.rows if self._log is not None else None

    def report(self, loss: Any = None) -> Optional[Dict[str, Any]]:
        """Records the update taken since the previous call, if any (one small read from the device).

        Args:
          loss: the update's loss as a float or a scalar tensor (a custom loop's reduced loss, `fit`'s logged
            loss), or None.

        Returns:
          The update's metrics row (the columns of metrics.csv), or None if no update was taken since the
          previous call (micro-batches accumulating).

        Raises:
          ArgumentError: a `loss` that is not a scalar.
          RewindLimitError: the update hit the rewind limit (after `last_good` saved the state).
        """
        before, now = self._latest, self._read(loss)
        if now.updates == before.updates:
            return None
        self._latest = now
        action = _action(before, now, spike_skips=self.step.skip_spikes is not None)
        groups_over = now.groups is not None and any(
            n > c for n, c in zip(now.groups.norms, now.groups.clip_norms, strict=True))
        clipped = int(action == "applied" and (now.global_norm > now.threshold or groups_over))
        skipped = action != "applied" and (action != "nonfinite" or self.step.options.nonfinite == "skip")
        row = {"step": self.next_step, "loss": now.loss, "global_norm": now.global_norm, "scale": now.scale,
               "clip_norm": now.threshold, "clipped": clipped, "skipped": int(skipped), "action": action}
        self.clipped_steps += clipped
        if self._log is not None:
            self._log.write(row)
            if now.noise is not None:
                self._log.write_noise(self.next_step, now.noise)
            if now.groups is not None:
                self._log.write_groups(self.next_step, self._group_names, *now.groups)
            if self.variable_norms_every and self.next_step % self.variable_norms_every == 0:
                norms = read_value(self.step.variable_norms).numpy().tolist()  # on these updates only
                self._log.write_norms(self.next_step, self._names, norms)
        if action == "nonfinite":
            self._nonfinite(skipped)
        if action == "spike_skipped":
            loss = "" if math.isnan(now.loss) else f", loss {now.loss:.6g}"
            self._line(f"step {self.next_step} skipped: a spike (global norm {now.global_norm:.6g}{loss}); "
                       f"{now.rewind_skipped} skipped so far")
        self.next_step += 1
        if action in ("rewound", "stopped"):
            self._rewound(now.latest_rewind)
        return row

    def _read(self, loss: Any) -> _Read:
        """The counters and the latest update's scalars, in one transfer from the device (`_pack`)."""
        given = self._no_loss
        if loss is not None and not isinstance(loss, (int, float, np.floating, np.integer)):
            loss = tf.convert_to_tensor(loss)
            if loss.shape.rank != 0 or not (loss.dtype.is_floating or loss.dtype.is_integer):
                raise ArgumentError(f"loss must be a scalar (the loss as the loop reduced it); got loss={loss!r}")
            given = tf.cast(loss, tf.float32)
        packed = self._packed(given).numpy()
        ints, bits = packed[:9], packed[9:].astype(np.int32).view(np.float32).tolist()
        if isinstance(loss, tf.Tensor):
            loss = bits[3]
        k = len(self._group_names)
        groups, bits = (GroupRead(bits[-3 * k:-2 * k], bits[-2 * k:-k], bits[-k:]), bits[:-3 * k]) if k else \
            (None, bits)
        return _Read(updates=int(ints[0]), skipped_steps=int(ints[1]), finite=bool(ints[2]),
                     rewind_skipped=int(ints[3]), rewinds=int(ints[4]),
                     latest_rewind=RewindEvent(int(ints[5]), int(ints[6]), int(ints[7]), bool(ints[8])),
                     global_norm=bits[0], threshold=bits[1], scale=bits[2],
                     loss=math.nan if loss is None else float(loss),
                     noise=None if len(bits) == 4 else NoiseEstimate(*bits[4:7]), groups=groups)

    def _pack(self, loss: tf.Tensor) -> tf.Tensor:
        """One int64 vector: the update count (applied or skipped; a rewind counts every update it saw), the
        non-finite skips, whether the latest norm was finite, the rewind's skips and rewinds and its latest
        event, then the bits of the float32 norm, threshold, scale, `loss`, the noise scale's estimates and the
        groups' norms, thresholds and scales."""
        update = self.step._update
        state, rewinding = update.state, update.rewinding
        skips = tf.cast(read_value(state.skipped_steps), tf.int64)
        if rewinding is None:
            counts = [tf.cast(read_value(update.stepper.iterations), tf.int64) + skips, skips, state.finite, 0, 0]
            latest: Any = tf.zeros([4], tf.int64)
        else:
            counts = [rewinding.updates, skips, state.finite, rewinding.skipped, rewinding.rewinds]
            latest = read_value(rewinding.latest)
        floats = [read_value(f) for f in (state.global_norm, state.threshold_used, state.clip_scale)] + [loss]
        floats += [] if state.noise is None else list(state.noise.latest())
        vectors = [] if state.group_norms is None else \
            [read_value(v) for v in (state.group_norms, state.group_clip_norms, state.group_scales)]
        packed_floats = tf.concat([tf.stack([tf.cast(f, tf.float32) for f in floats]), *vectors], 0)
        return tf.concat([tf.stack([tf.cast(read_value(c), tf.int64) for c in counts]), tf.cast(latest, tf.int64),
                          tf.cast(tf.bitcast(packed_floats, tf.int32), tf.int64)], 0)

    def _line(self, text: str) -> None:
        if self._rank == 0:
            # A progress bar may have left its line open on a terminal.
            lead = "\n" if sys.stdout.isatty() else ""
            print(f"{lead}distclip: {text}", file=sys.stderr, flush=True)

    def _nonfinite(self, skipped: bool) -> None:
        flags = tf.concat([read_value(self.step.nonfinite_replicas),
                           read_value(self.step.nonfinite_variables)], 0).numpy()
        replicas = len(self._places)
        record = NonfiniteUpdate.from_flags(self.next_step, skipped, flags[:replicas], flags[replicas:],
                                            self._places, self._names)
        self.nonfinite.append(record)
        if self._log is not None:
            self._log.write_nonfinite(record)
        self._line(record.line())

    def _rewound(self, event: RewindEvent) -> None:
        """A rewind in the latest update: recorded; at the limit, the last good state saved and the error raised."""
        self.rewinds.append(event)
        if self._log is not None:
            self._log.write_rewind(event)
            self._log.flush()
        self._line(event.line())
        self.step.check_rewind_limit(self._save_last_good)

    def _save_last_good(self) -> Optional[str]:
        if self.last_good is None or callable(self.last_good):
            return None if self.last_good is None else self.last_good()
        if self._rank == 0:
            folder = os.path.join(self.log_dir, "last_good") if self.log_dir else tempfile.mkdtemp(prefix="distclip-")
            return self.last_good.write(os.path.join(folder, "ckpt"))
        scratch = tempfile.mkdtemp(prefix="distclip-scratch-")
        try:
            self.last_good.write(os.path.join(scratch, "ckpt"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None

    def flush(self) -> None:
        """Puts every row written so far on disk (call it before a checkpoint, so that a resumed run finds them)."""
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        """Flushes and closes the files (rank 0 with a `log_dir`)."""
        if self._log is not None:
            self._log.close()


def _action(before: _Read, now: _Read, spike_skips: bool) -> str:
    """What the latest update did, from the counters before and after it (a rewind's skip count moves for a
    skip, a rewind and a stop alike; the rewind count only for the last two; with `spike_skips` (a step with
    `skip_spikes`), the skip count moves for a skipped spike alone)."""
    if now.rewind_skipped == before.rewind_skipped:
        return "applied" if now.finite else "nonfinite"
    if now.rewinds == before.rewinds:
        return "spike_skipped" if spike_skips else "skipped"
    return "stopped" if now.latest_rewind.stopped else "rewound"
