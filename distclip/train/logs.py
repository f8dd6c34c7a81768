"""What `distclip train` writes: a CSV row and TensorBoard scalars per step, a PNG plot, a summary."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

COLUMNS = ("step", "loss", "global_norm", "scale", "clip_norm", "clipped", "skipped")


class StepLog:
    """Per-step metrics to `metrics.csv` and TensorBoard event files under `out/tensorboard`."""

    def __init__(self, out: str, first_step: Optional[int] = None):
        """`first_step`: continue a resumed run's metrics.csv, keeping the rows of the steps before it."""
        os.makedirs(out, exist_ok=True)
        self.csv_path = os.path.join(out, "metrics.csv")
        kept: List[List[str]] = []  # the earlier rows, exactly as written
        if first_step is not None and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))[1:first_step + 1]
            # Rows after the checkpoint (and a line cut short by a kill) go; those before it were flushed whole.
            kept = [r for i, r in enumerate(rows) if len(r) == len(COLUMNS) and r[0] == str(i)]
        self.rows: List[Dict[str, float]] = [{c: float(v) for c, v in zip(COLUMNS, r)} for r in kept]
        self._file = open(self.csv_path, "w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(COLUMNS)
        self._csv.writerows(kept)
        self._tb = tf.summary.create_file_writer(os.path.join(out, "tensorboard"))

    def write(self, row: Dict[str, float]) -> None:
        self.rows.append(row)
        self._csv.writerow([row[c] for c in COLUMNS])
        with self._tb.as_default(step=int(row["step"])):
            for name in ("loss", "global_norm", "scale", "clip_norm", "skipped"):
                if math.isfinite(row[name]):
                    tf.summary.scalar(name, row[name])

    def flush(self) -> None:
        self._file.flush()
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_csv(path: str) -> List[Dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _running_median(values: Sequence[float], window: int) -> List[float]:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return [float(np.nanmedian(v[max(0, i - window + 1):i + 1])) if np.isfinite(v[max(0, i - window + 1):i + 1]).any()
            else float("nan") for i in range(len(v))]


def plot(rows: Sequence[Dict[str, float]], path: str, title: str, baseline: Optional[Tuple[float, str]] = None) -> None:
    """Global norm against the threshold (top) and loss (bottom) over steps, both log scale.

    `baseline`: (loss, label) drawn as a dotted line under the loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 100)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    norms = [r["global_norm"] for r in rows]
    top.plot(steps, norms, lw=0.5, alpha=0.5, label="global norm (before clipping)")
    top.plot(steps, _running_median(norms, window), lw=1.2, color="tab:blue", label=f"running median ({window} steps)")
    # A threshold of float32's largest value or more means "no clipping" (distclip train --clip-norm none).
    thresholds = [r["clip_norm"] if r["clip_norm"] < 1e38 else math.nan for r in rows]
    if any(math.isfinite(t) for t in thresholds):
        top.plot(steps, thresholds, "r--", lw=1.2, label="clip_norm")
    skipped = [r["step"] for r in rows if r["skipped"]]
    if skipped:
        top.plot(skipped, [top.get_ylim()[1]] * len(skipped), "kx", label="skipped (non-finite)")
    top.set_yscale("log")
    top.set_ylabel("gradient L2 norm")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=10)
    losses = [r["loss"] for r in rows]
    bottom.plot(steps, losses, lw=0.5, alpha=0.5, color="tab:green")
    bottom.plot(steps, _running_median(losses, window), lw=1.2, color="darkgreen", label=f"running median ({window} steps)")
    if baseline is not None:
        bottom.axhline(baseline[0], color="gray", ls=":", lw=1, label=baseline[1])
    bottom.set_yscale("log")
    bottom.set_ylabel("training loss")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
