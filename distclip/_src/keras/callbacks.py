"""Callbacks for `model.fit` with `ClipOptimizer`."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import keras
import tensorflow as tf

from distclip._src import sync
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.reporter import ClipReporter, check_log_options
from distclip._src.variables import tf_variable


class BroadcastCallback(keras.callbacks.Callback):
    """Makes every process start from rank `root`'s model and optimizer variables (Horovod).

    At the start of `fit` (the optimizer is built by then) it calls
    `distclip.broadcast_from_root(model.variables + optimizer.variables, root)`:
    a broadcast under Horovod, nothing under tf.distribute, whose strategies
    create identical variables on every replica already.

    Args:
      root: the rank whose variables every process takes.
    """

    def __init__(self, root: int = 0) -> None:
        super().__init__()
        self.root = root

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Broadcasts the model's and the optimizer's variables from rank `root`.

        Args:
          logs: unused (Keras's callback signature).
        """
        optimizer = getattr(self.model, "optimizer", None)
        variables = list(self.model.variables) + (list(optimizer.variables) if optimizer is not None else [])
        sync.broadcast_from_root(variables, self.root)


class ClipLogger(keras.callbacks.Callback):
    """Puts what `ClipOptimizer` saw each step into `fit`'s logs, and a `distclip.ClipReporter`'s records.

    Logs (progress bar and `History`): `global_norm` and `clip_scale`, means
    over the epoch's steps with a finite norm so far, and `skipped_steps`, the
    steps skipped since the start (non-finite synchronized norm).

    Everything else is the `distclip.ClipReporter` it starts at the
    beginning of `fit` (`reporter`), called at each batch end `fit` reports
    (every `steps_per_execution` steps) with `fit`'s logged loss (a running
    mean over the epoch): the line on stderr on rank 0 for each non-finite
    update and each rewind, and with `log_dir`, `metrics.csv`,
    `nonfinite.csv`, `layer_norms.csv`, `rewinds.csv`, `group_norms.csv`
    (with `distclip.ClipGroups`) and TensorBoard under
    `log_dir/tensorboard`, written by rank 0 (what `distclip plot log_dir`
    draws). `nonfinite`, `rewinds`, `clipped_steps` and `rows` are the
    reporter's. With `accumulation_steps=k` a step is recorded every k-th
    batch.

    With `variable_norms_every=N` (and a `ClipOptimizer(...,
    variable_norms=True)`), every N-th update's per-layer norms go to
    `log_dir/layer_norms.csv` and TensorBoard. With a `noise_scale`,
    `b_simple` joins `fit`'s logs; at the first batch its
    `global_batch_size` is checked against the examples `fit` fed
    (`ArgumentError` if they differ; the noise scale changes no update).

    With a `ClipOptimizer(..., rewind=...)`, `rewinds` joins `fit`'s logs.
    When the rewind limit is hit, the last
    good snapshot is saved as `tf.train.Checkpoint(model=model,
    optimizer=optimizer)` (not a `.keras` file) to `log_dir/last_good/ckpt`
    (a new temporary folder without `log_dir`), by rank 0 (every rank writes,
    MultiWorkerMirroredStrategy's rule; the others' copies are discarded), and
    `fit` ends with `distclip.RewindLimitError` naming that path on rank 0.
    Restore it into the same model and optimizer with
    `tf.train.Checkpoint(model=model, optimizer=optimizer).read(path)` (the
    pair of the `write` that saved it), then `fit` again.

    Args:
      log_dir: the folder for metrics.csv and tensorboard/, or None (the
        logs of `fit` only).
      initial_step: the number of the first step logged (0 to 2**62), for a run resumed
        from a checkpoint taken after that many steps; metrics.csv then keeps
        its rows of the steps before it and drops the rest (0: a new file).
      variable_norms_every: N, 1 to 2**62, to write per-layer norms every N updates
        (needs `log_dir`), or 0 (never).

    Raises:
      ArgumentError: an `initial_step` or `variable_norms_every` that is not an integer from 0 to 2**62.
      ContextError: a `log_dir` where the tensorboard package is not installed.
    """

    def __init__(self, log_dir: Optional[str] = None, initial_step: int = 0, variable_norms_every: int = 0) -> None:
        super().__init__()
        check_log_options("ClipLogger", log_dir, "initial_step", initial_step, variable_norms_every)
        self.log_dir = log_dir
        self.initial_step = initial_step
        self.variable_norms_every = variable_norms_every
        self.reporter: Optional[ClipReporter] = None

    # What the reporter keeps, on every rank (empty before `fit`).
    clipped_steps = property(lambda self: self.reporter.clipped_steps if self.reporter else 0,
                             doc="Steps whose norm exceeded the threshold, counted on every rank.")
    nonfinite = property(lambda self: self.reporter.nonfinite if self.reporter else [],
                         doc="The non-finite updates seen (`distclip.NonfiniteUpdate`), on every rank.")
    rewinds = property(lambda self: self.reporter.rewinds if self.reporter else [],
                       doc="The rewinds seen (`distclip.RewindEvent`), on every rank.")
    rows = property(lambda self: self.reporter.rows if self.reporter else None,
                    doc="The rows written so far (rank 0 with a `log_dir`), else None.")

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Finds the `ClipOptimizer` and starts its `distclip.ClipReporter` (with a `log_dir`, rank 0 opens the
        files).

        Args:
          logs: unused (Keras's callback signature).

        Raises:
          ContextError: the model's optimizer is not a `ClipOptimizer`, or `variable_norms_every` without
            `ClipOptimizer(..., variable_norms=True)`.
        """
        from distclip._src.keras.optimizer import ClipOptimizer

        optimizer = getattr(self.model, "optimizer", None)
        if not isinstance(optimizer, ClipOptimizer):
            raise ContextError(
                f"ClipLogger needs a model compiled with distclip.keras.ClipOptimizer; got {optimizer!r}")
        self._opt = optimizer
        self._batch_checked = False
        self.reporter = ClipReporter(
            optimizer, self.model.trainable_variables, log_dir=self.log_dir, first_step=self.initial_step,
            variable_norms_every=self.variable_norms_every,
            last_good=tf.train.Checkpoint(model=self.model, optimizer=optimizer))

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Starts the epoch's means of `global_norm` and `clip_scale`.

        Args:
          epoch: the epoch's index.
          logs: unused (Keras's callback signature).
        """
        self._sums = {"global_norm": 0.0, "clip_scale": 0.0}
        self._finite = 0

    def _summary(self) -> Dict[str, float]:
        assert self.reporter is not None
        latest = self.reporter._latest  # the counters as of the latest update (or the start of fit)
        means = {k: v / self._finite if self._finite else float("nan") for k, v in self._sums.items()}
        noise = {} if latest.noise is None else {"b_simple": latest.noise.b_simple}
        rewinds = {} if self._opt.rewind is None else {"rewinds": float(latest.rewinds)}
        return {**means, "skipped_steps": float(latest.skipped_steps), **noise, **rewinds}

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Records the update since the last call, if one was taken (`ClipReporter.report`).

        Args:
          batch: the batch's index in the epoch.
          logs: `fit`'s logs; `loss` is written to metrics.csv.
        """
        assert self.reporter is not None
        if not self._batch_checked:
            self._batch_checked = True
            self._check_noise_batch(self._opt, batch)
        row = self.reporter.report(loss=(logs or {}).get("loss"))
        if row is not None and math.isfinite(row["global_norm"]):
            self._finite += 1
            self._sums["global_norm"] += row["global_norm"]
            self._sums["clip_scale"] += row["scale"]
        if logs is not None:
            logs.update(self._summary())

    def _check_noise_batch(self, optimizer, batch: int) -> None:
        """With a `noise_scale`, at the first batch `fit` reports: its `global_batch_size` must be the examples
        of one update (the global batch times `accumulation_steps`). `fit`'s loss tracker counts the examples
        (each process its own replicas'); the noise scale influences no update, so nothing trained is wrong."""
        noise = optimizer.noise_scale
        tracker = next((m for m in self.model.metrics if m.name == "loss"), None)
        if noise is None or tracker is None:
            return
        count = tf_variable(tracker.count)
        parts = count.values if isinstance(count, tf.distribute.DistributedValues) else (count,)
        local = sum(float(p.numpy()) for p in parts)
        per_update = local * sync.current(self.model.variables).size() / (batch + 1) * \
            optimizer.options.accumulation_steps
        if per_update != noise.global_batch_size:
            raise ArgumentError(
                f"NoiseScale(global_batch_size={noise.global_batch_size}) does not match the data fit measures: "
                f"{per_update:g} examples per update ({per_update / optimizer.options.accumulation_steps:g} per "
                f"batch over all replicas, times accumulation_steps={optimizer.options.accumulation_steps}). "
                f"Pass NoiseScale(global_batch_size={per_update:g})")

    def flush(self) -> None:
        """Writes the rows so far to disk (before a checkpoint, so that a resumed run finds them)."""
        if self.reporter is not None:
            self.reporter.flush()

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Adds `global_norm`, `clip_scale` and `skipped_steps` to the epoch's logs (and so to `History`).

        Args:
          epoch: the epoch's index.
          logs: `fit`'s logs, updated in place.
        """
        if logs is not None:
            logs.update(self._summary())

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Closes metrics.csv and the TensorBoard writer.

        Args:
          logs: unused (Keras's callback signature).
        """
        if self.reporter is not None:
            self.reporter.close()
