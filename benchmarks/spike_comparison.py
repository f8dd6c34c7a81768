"""The stability tools side by side on the main job with spikes injected: held-out MSE, updates lost, a plot.

Runs `distclip train --spike-at 3000,6000` (two batches whose targets are
multiplied by 100) once per tool and seed, and the plain clip without spikes
for reference, each in its own folder under --out,
then writes OUT/comparison.json, OUT/comparison.png (norm and loss per tool,
first seed) and prints a Markdown table (the one in docs/guide/stability.md):

    .venv/bin/python benchmarks/spike_comparison.py --out runs/spike-comparison

A run whose folder already holds a summary.json of the same seed, steps and spikes is read,
not run again (so an interrupted comparison continues); a folder holding
anything else is refused by `distclip train` itself.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

#: (name, flags of `distclip train`, whether the spikes are injected); every run also gets --seed.
TOOLS: Tuple[Tuple[str, Tuple[str, ...], bool], ...] = (
    ("clip_norm 1.0, no spikes", (), False),
    ("no clipping", ("--clip-norm", "none"), True),
    ("clip_norm 1.0", (), True),
    ("AutoClip", ("--clip-norm", "autoclip"), True),
    ("SpikeClip", ("--clip-norm", "spikeclip"), True),
    ("ZClip", ("--clip-norm", "zclip"), True),
    ("AGC 0.1, clip_norm 1.0", ("--agc", "0.1"), True),
    ("Rewind", ("--rewind", "50,2,100"), True),
    ("Rewind, then lr ramp and momentum reset",
     ("--rewind", "50,2,100", "--rewind-lr", "0.1,500", "--rewind-reset-moments"), True),
    ("SkipSpikes", ("--skip-spikes", "6,128"), True),
    ("recurrent kernel at 0.5, the rest at 1.0", ("--clip-group", ".*/recurrent_kernel=0.5"), True),
)


def folder(out: str, name: str, seed: int) -> str:
    return os.path.join(out, name.replace(" ", "_").replace(",", "").replace(".", "_"), f"seed{seed}")


def run(name: str, flags: Sequence[str], seed: int, spikes: str, steps: int, out: str) -> dict:
    """One `distclip train` run's summary.json (run it unless an identical one is there)."""
    path = folder(out, name, seed)
    argv = ["train", "--seed", str(seed), "--steps", str(steps), *(["--spike-at", spikes] if spikes else []),
            "--out", path, *flags]
    summary_path = os.path.join(path, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        c = summary["config"]
        if (c["seed"], c["steps"], ",".join(map(str, c["spike_at"]))) == (seed, steps, spikes):
            return summary
    print(f"spike_comparison: {name}, seed {seed}: distclip {' '.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "distclip", *argv], check=True, stdout=subprocess.DEVNULL)
    with open(summary_path) as f:
        return json.load(f)


def rows_of(path: str) -> List[Dict[str, str]]:
    with open(os.path.join(path, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def spike_norms(path: str, spikes: Sequence[int]) -> List[float]:
    """What each spike step's update put in: the norm after clipping (norm * scale; 0 if not applied)."""
    by_step = {int(r["step"]): r for r in rows_of(path)}
    out = []
    for s in spikes:
        r = by_step.get(s)
        out.append(float(r["global_norm"]) * float(r["scale"]) if r is not None and r["action"] == "applied" else 0.0)
    return out


def updates_lost(summary: dict) -> int:
    """Updates not learned from: non-finite skips, spikes skipped, and each rewind's span (the updates since the
    snapshot it went back to, the spike's and the ones skipped after it)."""
    spans = sum(r["skip_through_step"] - r["to_step"] + 1 for r in summary["rewinds"] if not r["stopped"])
    return summary["steps_skipped"] + summary["spikes_skipped"] + spans


def plot(out: str, seed: int, spikes: Sequence[int], tools: Sequence[Tuple[str, Tuple[str, ...], bool]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tools), 2, figsize=(11, 1.9 * len(tools)), sharex=True, squeeze=False)
    for (name, _, _), (left, right) in zip(tools, axes, strict=True):
        rows = rows_of(folder(out, name, seed))
        steps = [int(r["step"]) for r in rows]
        norm = [float(r["global_norm"]) for r in rows]
        used = [float(r["clip_norm"]) if float(r["clip_norm"]) < 1e38 else math.nan for r in rows]
        left.semilogy(steps, norm, lw=0.4, color="tab:blue", label="global norm")
        left.semilogy(steps, used, lw=0.8, color="tab:red", label="threshold")
        right.semilogy(steps, [float(r["loss"]) for r in rows], lw=0.4, color="tab:green", label="loss")
        left.set_ylabel(name, fontsize=8)
        for ax in (left, right):
            for s in spikes:
                ax.axvline(s, color="grey", lw=0.6, ls=":")
            ax.tick_params(labelsize=7)
    axes[0][0].set_title("global norm (blue) and threshold (red)", fontsize=9)
    axes[0][1].set_title("training loss (per step)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(f"distclip train --spike-at {','.join(map(str, spikes))}, seed {seed} (dotted: the spikes)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path = os.path.join(out, "comparison.png")
    fig.savefig(path, dpi=90)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/spike-comparison", help="a folder per tool and seed, and the results")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the plot shows the first)")
    p.add_argument("--spike-at", default="3000,6000", help="passed to distclip train --spike-at")
    p.add_argument("--steps", type=int, default=10000, help="passed to distclip train --steps")
    p.add_argument("--tool", action="append", choices=[name for name, _, _ in TOOLS], metavar="NAME",
                   help="run only this tool (repeat for more; default: every tool, in the order of TOOLS)")
    args = p.parse_args()
    tools = [t for t in TOOLS if args.tool is None or t[0] in args.tool]
    seeds = [int(s) for s in args.seeds.split(",")]
    spikes = [int(s) for s in args.spike_at.split(",")]
    if not seeds or any(s < 0 for s in seeds):
        p.error(f"--seeds must be non-negative integers; got {args.seeds!r}")

    results = []
    for name, flags, spiked in tools:
        runs = [run(name, flags, seed, args.spike_at if spiked else "", args.steps, args.out) for seed in seeds]
        mse = [r["eval_mse"] for r in runs]
        applied = [spike_norms(folder(args.out, name, seed), spikes) for seed in seeds] if spiked else None
        results.append({"tool": name, "flags": " ".join(flags), "spikes": spiked, "eval_mse": mse,
                        "median_eval_mse": statistics.median(mse), "updates_lost": [updates_lost(r) for r in runs],
                        "spike_update_norms": applied})
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump({"spike_at": spikes, "seeds": seeds, "steps": args.steps, "results": results}, f, indent=2)
    print(f"plot: {plot(args.out, seeds[0], spikes, tools)}")

    print(f"\n| tool (`distclip train` flags) | held-out MSE, seeds {', '.join(map(str, seeds))} | median | "
          "updates lost | norm of each spike's update |")
    print("|---|---|---|---|---|")
    def fmt(values: Sequence[float]) -> str:
        return ", ".join(f"{v:.2g}" for v in values)

    for r in results:
        print(f"| {r['tool']} (`{r['flags'] or 'defaults'}`) | {', '.join(f'{m:.4g}' for m in r['eval_mse'])} | "
              f"{r['median_eval_mse']:.4g} | {', '.join(map(str, r['updates_lost']))} | "
              f"{'; '.join(fmt(a) for a in r['spike_update_norms']) if r['spikes'] else '(no spikes)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
