"""The training loop of `distclip train`: a custom loop with ClipStep under any strategy."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict

import keras
import numpy as np
import tensorflow as tf

from distclip.step import ClipStep
from distclip.verify import verify_replicas
from distclip.train import adding
from distclip.train.checkpoint import Checkpoints, Progress, StopOnSigterm, announce, stopped
from distclip.train.config import Config
from distclip.train.logs import StepLog, plot

# With no clipping the same ClipStep runs with the largest finite float32
# threshold and nonfinite="propagate": exactly plain SGD, and the norm is logged.
NO_CLIP = float(np.finfo(np.float32).max)


def run(cfg: Config, engine) -> dict:
    """Trains per `cfg` on `engine` (see `distclip.train.engines`); returns the summary, the same on every rank."""
    replicas = engine.replicas
    if cfg.batch_size % replicas:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {replicas} replicas")
    if cfg.fit:
        from distclip.train.fit import run_fit

        return run_fit(cfg, engine)
    chief = engine.chief

    with engine.scope():
        model = adding.model(cfg.length, cfg.units, cfg.seed, cfg.recurrent_gain)
        optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=0.9)
        clip = ClipStep(
            optimizer,
            NO_CLIP if cfg.clip_norm is None else cfg.clip_norm,
            nonfinite="propagate" if cfg.clip_norm is None else "skip",
        )
        clip.build(model.trainable_variables)
    engine.broadcast(model.variables + optimizer.variables)
    progress = Progress()
    checkpoints = Checkpoints(cfg, engine, model=model, optimizer=optimizer, clip=clip, progress=progress)
    first = checkpoints.restore() if cfg.resume else 0
    announce(cfg, engine, checkpoints, first)

    def replica_fn(x, y, loss_denominator):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / loss_denominator
        return loss, clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    train_step = engine.compile(replica_fn, cfg.batch_size)

    log = StepLog(cfg.out, first_step=first if cfg.resume else None) if chief else None
    bar = keras.utils.Progbar(cfg.steps, stateful_metrics=["norm", "clip"], interval=0.1 if sys.stdout.isatty() else 10.0, verbose=1 if chief else 0)
    threshold = math.inf if cfg.clip_norm is None else cfg.clip_norm
    start = time.monotonic()
    with StopOnSigterm("distclip train") as sigterm:
        for step in range(first, cfg.steps):
            x, y = adding.batch(cfg.seed, step, cfg.batch_size, cfg.length)
            # `stop`: whether any rank was sent SIGTERM, agreed on in the step's own loss reduction.
            loss, stop, norm, scale, clipped, finite = (v.numpy() for v in train_step(x, y, sigterm.requested))
            progress.record(step, float(loss), bool(clipped))
            if log:
                log.write(dict(step=step, loss=float(loss), global_norm=float(norm), scale=float(scale),
                               clip_norm=threshold, clipped=int(clipped), skipped=int(not finite and cfg.clip_norm is not None)))
            bar.update(step + 1, [("loss", float(loss)), ("norm", float(norm)), ("clip", float(clipped))])
            if checkpoints.after(step + 1, bool(stop), log.flush if log else lambda: None):
                if log:
                    log.close()
                stopped(cfg, engine, checkpoints, step + 1)
        checkpoints.save(cfg.steps)
    if log:
        log.close()
    elapsed = time.monotonic() - start
    return finish(cfg, engine, model, optimizer, final_loss=progress.final_loss(), clipped=int(progress.clipped.numpy()),
                  skipped=engine.read(clip.skipped_steps), seconds=elapsed, rows=log.rows if log else None)


def finish(cfg: Config, engine, model, optimizer, *, final_loss: float, clipped: int, skipped: int, seconds: float,
           rows) -> dict:
    """Checks the replicas, evaluates, and (chief only, `rows` given) writes plot.png and summary.json."""
    # Raises ReplicaMismatchError naming the first variable that differs.
    checked = len(verify_replicas(model.variables + optimizer.variables))
    x, y = adding.batch(cfg.seed + 10_000, 0, 1024, cfg.length)
    summary = {
        "strategy": engine.name,
        "replicas": engine.replicas,
        "clip_norm": cfg.clip_norm,
        "steps": cfg.steps,
        "final_loss": final_loss,
        "eval_mse": float(tf.reduce_mean(tf.square(model(x) - y))),
        "steps_clipped": clipped,
        "steps_skipped": skipped,  # counted by the clip step, identically on every replica
        "variables_verified_identical": checked,
        "seconds": round(seconds, 1),
        "config": asdict(cfg),
    }
    if rows is not None:
        title = f"adding problem, T={cfg.length}, {engine.replicas} replicas, " + (
            "no clipping" if cfg.clip_norm is None else f"clip_norm={cfg.clip_norm}") + (", model.fit" if cfg.fit else "")
        plot(rows, os.path.join(cfg.out, "plot.png"), title, baseline=(1 / 6, "predict the mean (MSE 0.167)"))
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
