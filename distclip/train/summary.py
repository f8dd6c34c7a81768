"""The end of a `distclip train` run: replicas checked, held-out error, summary.json and plot.png."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Sequence

import tensorflow as tf

from distclip import NonfiniteUpdate, RewindEvent, verify_replicas
from distclip.train import adding
from distclip.train.config import Config
from distclip.train.plots import plot, read_layers, read_rewinds


def finish(cfg: Config, runner, model, optimizer, step, *, final_loss: float, clipped: int, seconds: float,
           rows, nonfinite: Sequence[NonfiniteUpdate] = (), rewinds: Sequence[RewindEvent] = ()) -> dict:
    """Checks the replicas, evaluates, and (chief only, `rows` given) writes plot.png and summary.json.

    `step`: the run's `ClipStep` or `ClipOptimizer`, whose counters (non-finite skips, updates a rewind did not
    learn from) and latest noise scale estimates the summary reports; `nonfinite`: the run's non-finite updates
    with their sources; `rewinds`: the run's rewinds (the whole run's on the chief, whose log reads a resumed
    run's earlier ones back; this process's part of the run on the others).
    """
    noise = step.noise
    # Raises ReplicaMismatchError naming the first variable that differs.
    checked = len(verify_replicas(model.variables + optimizer.variables))
    x, y = adding.batch(cfg.seed + 10_000, 0, 1024, cfg.length)
    summary = {
        "strategy": runner.name,
        "replicas": runner.replicas,
        "clip_norm": cfg.clip_norm,
        "agc": cfg.agc,
        "clip_group": [list(g) for g in cfg.clip_group],
        "steps": cfg.steps,
        "final_loss": final_loss,
        "eval_mse": float(tf.reduce_mean(tf.square(model(x) - y))),
        "steps_clipped": clipped,
        # Counted by the clip step, identically on every replica: non-finite skips; updates a rewind did not learn
        # from (the spike's and the ones skipped after it).
        "steps_skipped": runner.read(step.skipped_steps),
        "steps_skipped_by_rewind": 0 if step.rewind_skipped_steps is None else runner.read(step.rewind_skipped_steps),
        "spikes_skipped": 0 if step.skipped_spikes is None else runner.read(step.skipped_spikes),
        "variables_verified_identical": checked,
        "nonfinite_steps": [{"step": r.step, "skipped": r.skipped, "replicas": [p._asdict() for p in r.replicas],
                             "variables": r.variables, "line": r.line()} for r in nonfinite],
        "rewinds": [{"step": r.at - 1, "to_step": r.to - 1,
                     "skip_through_step": None if r.stopped else r.skip_through - 1, "stopped": r.stopped,
                     "line": r.line()} for r in rewinds],
        "b_simple": None if noise is None else float(noise.b_simple),
        "seconds": round(seconds, 1),
        "config": asdict(cfg),
    }
    if rows is not None:
        title = f"adding problem, T={cfg.length}, {runner.replicas} replicas, " + (
            "no clipping" if cfg.clip_norm is None else f"clip_norm={cfg.clip_norm}"
        ) + "".join(f", {pattern}={threshold:g}" for pattern, threshold in cfg.clip_group) + (
            "" if cfg.agc is None else f", AGC {cfg.agc:g}") + (", model.fit" if cfg.fit else "")
        plot(rows, os.path.join(cfg.out, "plot.png"), title, baseline=(1 / 6, "predict the mean (MSE 0.167)"),
             layers=read_layers(cfg.out), rewinds=read_rewinds(cfg.out))
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
