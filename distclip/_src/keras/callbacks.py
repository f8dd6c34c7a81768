"""Callbacks for `model.fit` with `ClipOptimizer`."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import keras

from distclip._src import sync
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.steplog import StepLog, require_tensorboard


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
    scale, clip_norm, clipped, skipped; steps count from 0; loss is `fit`'s
    running mean over the epoch; what `distclip plot log_dir` draws) and
    the same scalars to TensorBoard under `log_dir/tensorboard`. It reads the
    optimizer's variables at each batch end `fit` reports (every
    `steps_per_execution` steps), and records a step when an update (or a
    skip) happened since: with `accumulation_steps=k`, every k-th batch.

    Args:
      log_dir: the folder for metrics.csv and tensorboard/, or None (the
        logs of `fit` only).
      initial_step: the number of the first step logged, for a run resumed
        from a checkpoint taken after that many steps; metrics.csv then keeps
        its rows of the steps before it and drops the rest (0: a new file).

    Raises:
      ArgumentError: a negative or non-integer `initial_step`.
      ContextError: a `log_dir` where the tensorboard package is not installed.
    """

    def __init__(self, log_dir: Optional[str] = None, initial_step: int = 0) -> None:
        super().__init__()
        if not isinstance(initial_step, int) or isinstance(initial_step, bool) or initial_step < 0:
            raise ArgumentError(f"initial_step must be an integer >= 0; got initial_step={initial_step!r}")
        if log_dir is not None:
            require_tensorboard(f"ClipLogger(log_dir={log_dir!r})")
        self.log_dir = log_dir
        self.initial_step = initial_step
        self._log: Optional[StepLog] = None
        self._step = initial_step
        self._skipped = 0
        #: Steps whose norm exceeded the threshold, counted on every rank.
        self.clipped_steps = 0

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
        self._skipped = int(optimizer.skipped_steps.numpy()) if optimizer.built else 0
        self._updates = self._skipped + int(optimizer.iterations.numpy())
        if self.log_dir and sync.current(self.model.variables).rank() == 0:
            self._log = StepLog(self.log_dir, first_step=self.initial_step or None)

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
        return {**means, "skipped_steps": float(self._skipped)}

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
        updates = skipped + int(optimizer.iterations.numpy())
        if updates != self._updates:  # else accumulating (accumulation_steps > 1): no update yet
            self._updates = updates
            self._record(optimizer, skipped, logs)
        if logs is not None:
            logs.update(self._summary())

    def _record(self, optimizer, skipped: int, logs) -> None:
        """Takes in the latest update: epoch sums, clipped count, and (rank 0) a CSV/TensorBoard row."""
        norm, scale = float(optimizer.global_norm.numpy()), float(optimizer.clip_scale.numpy())
        if math.isfinite(norm):
            self._finite += 1
            self._sums["global_norm"] += norm
            self._sums["clip_scale"] += scale
        threshold = float(optimizer.clip_norm_used.numpy())
        clipped = int(math.isfinite(norm) and norm > threshold)
        self.clipped_steps += clipped
        if self._log is not None:
            self._log.write({
                "step": self._step, "loss": float((logs or {}).get("loss", math.nan)), "global_norm": norm,
                "scale": scale, "clip_norm": threshold, "clipped": clipped, "skipped": skipped - self._skipped,
            })
        self._step += 1
        self._skipped = skipped

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
