"""Per-step clip metrics to a CSV file and TensorBoard: what `ClipLogger` and `distclip train` write.

One row per update, in `metrics.csv` with the columns of `COLUMNS`:
`step` (from 0), `loss`, `global_norm` (synchronized, before clipping, in the
gradients' units), `scale` (the clip factor applied), `clip_norm` (the
threshold used; inf for `clip_norm=None`), `clipped` and `skipped` (0 or 1).
The same scalars go to TensorBoard event files under `tensorboard/`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from typing import Dict, List, Optional

import tensorflow as tf

from distclip._src.errors import ContextError

COLUMNS = ("step", "loss", "global_norm", "scale", "clip_norm", "clipped", "skipped")


def write_atomically(path: str, text: str) -> None:
    """Replaces `path` with `text` so that a kill at any moment leaves either the old file or the whole new one:
    a temporary file beside it, flushed and fsynced, then renamed over it."""
    partial = path + ".partial"
    with open(partial, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def require_tensorboard(what: str) -> None:
    """Raises ContextError, saying what to install, when `tf.summary` has no TensorBoard to write with.

    TensorFlow 2.21's wheel no longer brings TensorBoard; without it `tf.summary.scalar` fails at the first
    write, in the middle of training. This check runs before anything is written.
    """
    if importlib.util.find_spec("tensorboard") is None:
        raise ContextError(f"{what} writes TensorBoard event files, which needs the tensorboard package: "
                           "pip install tensorboard")


class StepLog:
    """Per-step metrics to `metrics.csv` and TensorBoard event files under `out/tensorboard`."""

    def __init__(self, out: str, first_step: Optional[int] = None):
        """`first_step`: continue a resumed run's metrics.csv, keeping the rows of the steps before it.

        The kept rows are rewritten atomically (a temporary file, flushed and fsynced, then renamed over
        metrics.csv) before this returns, so a kill at any later moment leaves them all on disk.
        """
        require_tensorboard("StepLog")
        os.makedirs(out, exist_ok=True)
        self.csv_path = os.path.join(out, "metrics.csv")
        kept: List[List[str]] = []  # the earlier rows, exactly as written
        if first_step is not None and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))[1:first_step + 1]
            # Rows after the checkpoint (and a line cut short by a kill) go; those before it were flushed whole.
            kept = [r for i, r in enumerate(rows) if len(r) == len(COLUMNS) and r[0] == str(i)]
        self.rows: List[Dict[str, float]] = [{c: float(v) for c, v in zip(COLUMNS, r, strict=True)} for r in kept]
        text = io.StringIO(newline="")
        csv.writer(text).writerows([COLUMNS, *kept])
        write_atomically(self.csv_path, text.getvalue())
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.writer(self._file)
        self._tb = tf.summary.create_file_writer(os.path.join(out, "tensorboard"))

    def write(self, row: Dict[str, float]) -> None:
        self.rows.append(row)
        self._csv.writerow([row[c] for c in COLUMNS])
        with self._tb.as_default(step=int(row["step"])):
            for name in ("loss", "global_norm", "scale", "clip_norm", "skipped"):
                if math.isfinite(row[name]):
                    tf.summary.scalar(name, row[name])

    def flush(self) -> None:
        """Puts every row written so far on disk (before each checkpoint: a resume keeps them)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


