"""Callbacks for `model.fit` with `ClipOptimizer`."""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf

from distclip._src import sync
from distclip._src.attribution import describe, nonfinite, replica_places
from distclip._src.checks import check_integer
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.rewind import RewindEvent
from distclip._src.rewind import describe as describe_rewind
from distclip._src.steplog import Actions, StepLog, require_tensorboard
from distclip._src.variables import tf_variable, variable_name


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
    """Puts what `ClipOptimizer` saw each step into `fit`'s logs, and optionally TensorBoard and a CSV.

    Logs (progress bar and `History`): `global_norm` and `clip_scale`, means
    over the epoch's steps with a finite norm so far, and `skipped_steps`, the
    steps skipped since the start (non-finite synchronized norm).

    With `log_dir`, the process of rank 0 only (`distclip._src.sync.current(model.variables).rank()`) writes a row
    per step to `log_dir/metrics.csv` (step, loss, global_norm before clipping,
    scale, clip_norm, clipped, skipped, action: applied, nonfinite, skipped,
    rewound or stopped; steps count from 0; loss is `fit`'s logged loss, a
    running mean over the epoch; what `distclip plot log_dir` draws) and
    the same scalars to TensorBoard under `log_dir/tensorboard`. It reads the
    optimizer's variables at each batch end `fit` reports (every
    `steps_per_execution` steps), and records a step when an update (or a
    skip) happened since: with `accumulation_steps=k`, every k-th batch.

    A non-finite update is named with its sources: `nonfinite` lists them
    (`step`, `skipped`, `replicas` as (replica, worker, host, device),
    `variables`) on every rank, and rank 0 prints a line to stderr, such as
    "step 12 skipped: non-finite gradients from replica 1 (worker 0, host
    node-3, CPU:1) in dense/kernel", and with `log_dir` adds it to
    `log_dir/nonfinite.csv` and TensorBoard (text `nonfinite`). Finding the
    replicas' hosts and devices is one small all-gather at the start of `fit`.

    With `variable_norms_every=N` (and a `ClipOptimizer(...,
    variable_norms=True)`), every N-th update's per-layer norms go to
    `log_dir/layer_norms.csv` and TensorBoard (`layer_norm/<layer>`, and a
    `variable_norms` histogram): one read of the norms on those updates
    only. With a `noise_scale`, `b_simple` joins `fit`'s logs and the
    estimates go to TensorBoard (`noise/...`); at the first batch its
    `global_batch_size` is checked against the examples `fit` fed
    (`ArgumentError` if they differ; the noise scale changes no update).

    With a `ClipOptimizer(..., rewind=...)`, `rewinds` joins `fit`'s logs;
    each rewind is kept in `rewinds` (`distclip.RewindEvent`) on every rank,
    and rank 0 prints its line ("step 130: spike: rewound to the snapshot
    before step 100, ...") and with `log_dir` adds it to `log_dir/rewinds.csv`
    and TensorBoard (text `rewind`). When the rewind limit is hit, the last
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
        check_integer("initial_step", initial_step, 0)
        check_integer("variable_norms_every", variable_norms_every, 0)
        if variable_norms_every and log_dir is None:
            raise ArgumentError(f"variable_norms_every={variable_norms_every} writes to a log_dir; got log_dir=None")
        if log_dir is not None:
            require_tensorboard(f"ClipLogger(log_dir={log_dir!r})")
        self.log_dir = log_dir
        self.initial_step = initial_step
        self._log: Optional[StepLog] = None
        self._step = initial_step
        self._batch_checked = False
        self._skipped = 0
        self.variable_norms_every = variable_norms_every
        #: Steps whose norm exceeded the threshold, counted on every rank.
        self.clipped_steps = 0
        #: The non-finite updates seen (`step`, `skipped`, `replicas`, `variables`), on every rank.
        self.nonfinite: List[Any] = []
        #: The rewinds seen (`distclip.RewindEvent`), on every rank.
        self.rewinds: List[RewindEvent] = []

    def _optimizer(self):
        from distclip._src.keras.optimizer import ClipOptimizer

        optimizer = getattr(self.model, "optimizer", None)
        if not isinstance(optimizer, ClipOptimizer):
            raise ContextError(
                f"ClipLogger needs a model compiled with distclip.keras.ClipOptimizer; got {optimizer!r}")
        return optimizer

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Finds the `ClipOptimizer` and, with a `log_dir`, opens metrics.csv and the TensorBoard writer (rank 0).

        Args:
          logs: unused (Keras's callback signature).

        Raises:
          ContextError: the model's optimizer is not a `ClipOptimizer`.
        """
        self._opt = optimizer = self._optimizer()
        self._batch_checked = False
        if self.variable_norms_every and not optimizer.options.variable_norms:
            raise ContextError(f"ClipLogger(variable_norms_every={self.variable_norms_every}) needs "
                               "ClipOptimizer(..., variable_norms=True)")
        self._noise = optimizer.noise if optimizer.built else None
        self._places = replica_places(self.model.variables)
        self._names = [variable_name(v) for v in self.model.trainable_variables]
        self._skipped = int(optimizer.skipped_steps.numpy()) if optimizer.built else 0
        self._updates = self._count_updates(optimizer)
        self._rewinds = int(optimizer.rewinds.numpy()) if optimizer.rewinds is not None else 0
        self._rank = sync.current(self.model.variables).rank()
        self._actions = Actions(optimizer._update.rewinding if optimizer.built else None,
                                skip_nonfinite=optimizer.options.nonfinite == "skip")
        if self.log_dir and self._rank == 0:
            self._log = StepLog(self.log_dir, first_step=self.initial_step or None)
            # A resumed run's earlier events, from the files the log kept.
            self.nonfinite, self.rewinds = self._log.earlier_nonfinite(), self._log.earlier_rewinds()

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Starts the epoch's means of `global_norm` and `clip_scale`.

        Args:
          epoch: the epoch's index.
          logs: unused (Keras's callback signature).
        """
        self._sums = {"global_norm": 0.0, "clip_scale": 0.0}
        self._finite = 0

    def _summary(self) -> Dict[str, float]:
        means = {k: v / self._finite if self._finite else float("nan") for k, v in self._sums.items()}
        noise = {} if self._noise is None else {"b_simple": float(self._noise.b_simple)}
        rewinds = {} if self._opt.rewinds is None else {"rewinds": float(self._rewinds)}
        return {**means, "skipped_steps": float(self._skipped), **noise, **rewinds}

    @property
    def rows(self):
        """The rows written so far (rank 0 with a `log_dir`), else None."""
        return self._log.rows if self._log is not None else None

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Records the step (or steps) since the last call, if an update or a skip happened.

        Args:
          batch: the batch's index in the epoch.
          logs: `fit`'s logs; `loss` is written to metrics.csv.
        """
        optimizer = self._opt
        skipped = int(optimizer.skipped_steps.numpy())
        updates = self._count_updates(optimizer)
        if self._actions.rewinding is None and optimizer._update.rewinding is not None:  # built by fit itself
            self._actions = Actions(optimizer._update.rewinding, skip_nonfinite=optimizer.options.nonfinite == "skip")
        if not self._batch_checked:
            self._batch_checked = True
            self._check_noise_batch(optimizer, batch)
        if updates != self._updates:  # else accumulating (accumulation_steps > 1): no update yet
            self._updates = updates
            norm = float(optimizer.global_norm.numpy())
            action = self._actions.latest(math.isfinite(norm))
            self._record(optimizer, norm, skipped, action, logs)
            if action in ("rewound", "stopped"):
                self._rewound(optimizer)
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

    @staticmethod
    def _count_updates(optimizer) -> int:
        """Updates so far: applied or skipped (a rewind counts every update it saw; `iterations` goes back)."""
        if not optimizer.built:
            return 0
        rewinding = optimizer._update.rewinding
        if rewinding is not None:
            return int(rewinding.updates.numpy())
        return int(optimizer.skipped_steps.numpy()) + int(optimizer.iterations.numpy())

    def _rewound(self, optimizer) -> None:
        """A rewind in the latest update: logged; at the limit, the last good state saved and the error raised."""
        self._rewinds = int(optimizer.rewinds.numpy())
        event = optimizer.latest_rewind()
        self.rewinds.append(event)
        if self._log is not None:
            self._log.write_rewind(event)
            self._log.flush()
        if self._rank == 0:
            print(f"distclip: {describe_rewind(event)}", file=sys.stderr, flush=True)
        optimizer.check_rewind_limit(self._save_last_good)

    def _save_last_good(self) -> Optional[str]:
        """Every rank writes the model and the optimizer (MultiWorkerMirroredStrategy's rule); rank 0's is kept,
        as `tf.train.Checkpoint(model=model, optimizer=optimizer)` at the path returned (None on other ranks)."""
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self._opt)
        if self._rank == 0:
            folder = os.path.join(self.log_dir, "last_good") if self.log_dir else tempfile.mkdtemp(prefix="distclip-")
            return checkpoint.write(os.path.join(folder, "ckpt"))
        scratch = tempfile.mkdtemp(prefix="distclip-scratch-")
        try:
            checkpoint.write(os.path.join(scratch, "ckpt"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None

    def _record(self, optimizer, norm: float, skipped: int, action: str, logs) -> None:
        """Takes in the latest update: epoch sums, clipped count, and (rank 0) a CSV/TensorBoard row."""
        scale = float(optimizer.clip_scale.numpy())
        if math.isfinite(norm):
            self._finite += 1
            self._sums["global_norm"] += norm
            self._sums["clip_scale"] += scale
        threshold = float(optimizer.clip_norm_used.numpy())
        clipped = int(action == "applied" and norm > threshold)
        self.clipped_steps += clipped
        if self._log is not None:
            self._log.write({
                "step": self._step, "loss": float((logs or {}).get("loss", math.nan)), "global_norm": norm,
                "scale": scale, "clip_norm": threshold, "clipped": clipped,
                "skipped": int(self._actions.skipped(action)), "action": action,
            })
        if action == "nonfinite":
            self._nonfinite(optimizer, skipped > self._skipped)
        self._noise = optimizer.noise  # read once per update: the logs and TensorBoard share it
        if self._log is not None and self._noise is not None:
            self._log.write_noise(self._step, self._noise)
        if self._log is not None and self.variable_norms_every and self._step % self.variable_norms_every == 0:
            self._log.write_norms(self._step, self._names, optimizer.variable_norms.numpy().tolist())
        self._step += 1
        self._skipped = skipped

    def _nonfinite(self, optimizer, skipped: bool) -> None:
        record = nonfinite(self._step, skipped, optimizer.nonfinite_replicas.numpy(),
                           optimizer.nonfinite_variables.numpy(), self._places, self._names)
        self.nonfinite.append(record)
        if self._log is not None:
            self._log.write_nonfinite(record)
        if self._rank == 0:
            print(f"distclip: {describe(record)}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Writes the rows so far to disk (before a checkpoint, so that a resumed run finds them)."""
        if self._log is not None:
            self._log.flush()

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
        if self._log is not None:
            self._log.close()
