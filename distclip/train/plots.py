"""What `distclip train` draws from its log: a PNG of the norms against the threshold, and the loss.

The log itself (metrics.csv, TensorBoard) is the library's `distclip._src.steplog`.
"""
from __future__ import annotations

import csv
import math
from typing import Dict, List, Optional, Sequence, Tuple


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
    # clip_norm=None logs an infinite threshold (logs written before 0.2 hold float32's largest value instead).
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
    bottom.plot(steps, _running_median(losses, window), lw=1.2, color="darkgreen",
                label=f"running median ({window} steps)")
    if baseline is not None:
        bottom.axhline(baseline[0], color="gray", ls=":", lw=1, label=baseline[1])
    bottom.set_yscale("log")
    bottom.set_ylabel("training loss")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
