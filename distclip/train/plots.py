"""What `distclip train` draws from its log: a PNG of the norms against the threshold, and the loss.

The log itself (metrics.csv, TensorBoard) is written by the library's `distclip.ClipReporter`.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple


def read_csv(path: str) -> List[Dict[str, float]]:
    """metrics.csv's numeric columns as floats (the `action` column, a name, is left out)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if k != "action"} for r in csv.DictReader(f)]


def read_layers(run_dir: str) -> Optional[Dict[str, List[Tuple[float, float]]]]:
    """`layer_norms.csv` of a run as {layer: [(step, norm), ...]}, or None if the run wrote none."""
    path = os.path.join(run_dir, "layer_norms.csv")
    if not os.path.isfile(path):
        return None
    layers: Dict[str, List[Tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            layers.setdefault(r["layer"], []).append((float(r["step"]), float(r["norm"])))
    return layers or None


def read_rewinds(run_dir: str) -> List[Tuple[float, float, float]]:
    """`rewinds.csv` of a run as [(spike step, to_step, skip_through_step), ...] (empty if it rewound never)."""
    path = os.path.join(run_dir, "rewinds.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        # A stopped rewind skips every step after it: its span ends at the spike.
        return [(float(r["step"]), float(r["to_step"]),
                 float(r["step"]) if r["skip_through_step"] == "stopped" else float(r["skip_through_step"]))
                for r in csv.DictReader(f)]


def largest_layers(layers: Dict[str, List[Tuple[float, float]]], count: int = 5) -> List[str]:
    """The `count` layers whose largest finite norm is largest, largest first."""
    def peak(points):
        finite = [n for _, n in points if math.isfinite(n)]
        return max(finite) if finite else -math.inf
    return sorted(layers, key=lambda name: peak(layers[name]), reverse=True)[:count]


def _running_median(values: Sequence[float], window: int) -> List[float]:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return [float(np.nanmedian(v[max(0, i - window + 1):i + 1])) if np.isfinite(v[max(0, i - window + 1):i + 1]).any()
            else float("nan") for i in range(len(v))]


def plot(rows: Sequence[Dict[str, float]], path: str, title: str, baseline: Optional[Tuple[float, str]] = None,
         layers: Optional[Dict[str, List[Tuple[float, float]]]] = None,
         rewinds: Sequence[Tuple[float, float, float]] = ()) -> None:
    """Global norm against the threshold (top) and loss (below) over steps, log scale; with `layers`
    (`read_layers`), a third panel of the 5 layers with the largest norms; each of `rewinds`
    (`read_rewinds`) as a shaded span of the steps not learned from and a line at the spike.

    `baseline`: (loss, label) drawn as a dotted line under the loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 100)
    fig, axes = plt.subplots(3 if layers else 2, 1, figsize=(8, 8.5 if layers else 6), sharex=True)
    top, bottom = axes[0], axes[1]
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
    bottom.legend(loc="upper right", fontsize=8)
    if layers:
        panel = axes[2]
        for name in largest_layers(layers):
            panel.plot([s for s, _ in layers[name]], [n for _, n in layers[name]], lw=0.8, label=name)
        panel.set_yscale("log")
        panel.set_ylabel("layer gradient norm")
        panel.legend(loc="upper right", fontsize=7, title="largest 5 layers", title_fontsize=7)
    for i, (at, to, through) in enumerate(rewinds):
        for ax in axes:
            ax.axvspan(to, through + 1, color="tab:orange", alpha=0.2, lw=0,
                       label="not learned from (rewind)" if i == 0 and ax is top else None)
            ax.axvline(at, color="tab:orange", lw=0.8)
    if rewinds:
        top.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
