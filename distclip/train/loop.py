"""The training loop of `distclip train`: a custom loop with ClipStep under any strategy."""
from __future__ import annotations

import functools
import sys
import time
from typing import Optional

import keras
import tensorflow as tf

from distclip._src.attribution import describe, nonfinite, replica_places
from distclip._src.noise import NoiseScale
from distclip._src.rewind import describe as describe_rewind
from distclip._src.step import ClipStep
from distclip._src.variables import variable_name
from distclip._src.steplog import Actions, StepLog
from distclip._src.threshold import resolve_clip_norm
from distclip.train import adding
from distclip.train.checkpoint import Checkpoints, Progress, StopOnSigterm, announce, stopped
from distclip.train.config import Config
from distclip.train.summary import finish


def save_at(checkpoints: Checkpoints, done: int) -> Optional[str]:
    """Saves the state after `done` steps (every rank, as a SIGTERM checkpoint does); returns the folder the
    chief wrote (None on the other ranks: the folder is the chief's)."""
    checkpoints.save(done)
    return checkpoints.directory if checkpoints.runner.chief else None


def run(cfg: Config, runner) -> dict:
    """Trains per `cfg` on `runner` (see `distclip.train.runners`); returns the summary, the same on every rank."""
    chief = runner.chief

    with runner.scope():
        model = adding.model(cfg.length, cfg.units, cfg.seed, cfg.recurrent_gain)
        optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=0.9)
        clip = ClipStep(optimizer, cfg.clip_norm, nonfinite=cfg.nonfinite,
                        variable_norms=cfg.variable_norms_every > 0,
                        noise_scale=NoiseScale(cfg.batch_size) if cfg.noise_scale else None,
                        rewind=cfg.rewind_config())
        clip.build(model.trainable_variables)
    runner.broadcast(model.variables + optimizer.variables)
    places = replica_places(model.variables)  # every rank, together
    names = [variable_name(v) for v in model.trainable_variables]
    records = []
    rewinds: list = []
    progress = Progress()
    checkpoints = Checkpoints(cfg, runner, model=model, optimizer=optimizer, clip=clip, progress=progress)
    first = checkpoints.restore() if cfg.resume else 0
    announce(cfg, runner, checkpoints, first)

    def replica_fn(x, y, loss_denominator):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / loss_denominator
        return loss, clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables,
                                loss=loss if cfg.rewind else None)

    train_step = runner.compile(replica_fn, cfg.batch_size)

    log = StepLog(cfg.out, first_step=first if cfg.resume else None) if chief else None
    if log:  # the run before a resume: its events are in the files the log kept
        records, rewinds = log.earlier_nonfinite(), log.earlier_rewinds()
    actions = Actions(clip.rewinding, skip_nonfinite=cfg.nonfinite == "skip")
    bar = keras.utils.Progbar(cfg.steps, stateful_metrics=["norm", "clip"],
                              interval=0.1 if sys.stdout.isatty() else 10.0, verbose=1 if chief else 0)
    threshold = float(resolve_clip_norm(cfg.clip_norm))  # inf for clip_norm=None
    start = time.monotonic()
    with StopOnSigterm("distclip train") as sigterm:
        for step in range(first, cfg.steps):
            x, y = adding.batch(cfg.seed, step, cfg.batch_size, cfg.length, nan=step in cfg.nan_at,
                                spike=step in cfg.spike_at)
            # `stop`: whether any rank was sent SIGTERM, agreed on in the step's own loss reduction.
            loss, stop, norm, scale, clipped, finite = (v.numpy() for v in train_step(x, y, sigterm.requested))
            action = actions.latest(bool(finite))
            clipped = bool(clipped) and action == "applied"
            progress.record(step, float(loss), clipped)
            if log:
                log.write(dict(step=step, loss=float(loss), global_norm=float(norm), scale=float(scale),
                               clip_norm=threshold, clipped=int(clipped), skipped=int(actions.skipped(action)),
                               action=action))
            if action == "nonfinite":
                records.append(nonfinite(step, cfg.nonfinite == "skip", clip.nonfinite_replicas.numpy(),
                                         clip.nonfinite_variables.numpy(), places, names))
                if chief:
                    print(f"\ndistclip: {describe(records[-1])}", file=sys.stderr, flush=True)
            if log:
                if action == "nonfinite":
                    log.write_nonfinite(records[-1])
                if cfg.variable_norms_every and step % cfg.variable_norms_every == 0:
                    log.write_norms(step, names, clip.variable_norms.numpy().tolist())
                if cfg.noise_scale:
                    log.write_noise(step, clip.noise)
            if action in ("rewound", "stopped"):
                rewinds.append(clip.latest_rewind())
                if chief:
                    print(f"\ndistclip: {describe_rewind(rewinds[-1])}", file=sys.stderr, flush=True)
                if log:
                    log.write_rewind(rewinds[-1])
                    log.flush()
                clip.check_rewind_limit(functools.partial(save_at, checkpoints, step + 1))
            bar.update(step + 1, [("loss", float(loss)), ("norm", float(norm)), ("clip", float(clipped))])
            if checkpoints.after(step + 1, bool(stop), log.flush if log else lambda: None):
                if log:
                    log.close()
                stopped(cfg, runner, checkpoints, step + 1)
        checkpoints.save(cfg.steps)
    if log:
        log.close()
    elapsed = time.monotonic() - start
    return finish(cfg, runner, model, optimizer, clip, final_loss=progress.final_loss(),
                  clipped=int(progress.clipped.numpy()), seconds=elapsed, rows=log.rows if log else None,
                  nonfinite=records, rewinds=rewinds)
