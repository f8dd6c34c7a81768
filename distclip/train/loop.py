"""The training loop of `distclip train`: a custom loop with ClipStep under any strategy."""
from __future__ import annotations

import sys
import time

import keras
import tensorflow as tf

import distclip
from distclip.train import adding
from distclip.train.checkpoint import Checkpoints, Progress, StopOnSigterm, announce, stopped
from distclip.train.config import Config
from distclip.train.summary import finish


def build(cfg: Config):
    """The model, its optimizer and the clip step, under the runner's scope."""
    model = adding.model(cfg.length, cfg.units, cfg.seed, cfg.recurrent_gain)
    optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=0.9)
    clip = distclip.ClipStep(optimizer, cfg.threshold(), nonfinite=cfg.nonfinite,
                             variable_norms=cfg.variable_norms_every > 0,
                             noise_scale=distclip.NoiseScale(cfg.batch_size) if cfg.noise_scale else None,
                             rewind=cfg.rewind_config(), skip_spikes=cfg.skip_spikes_config(),
                             agc=cfg.agc_config())
    clip.build(model.trainable_variables)
    return model, optimizer, clip


def run(cfg: Config, runner) -> dict:
    """Trains per `cfg` on `runner` (see `distclip.train.runners`); returns the summary, the same on every rank."""
    with runner.scope():
        model, optimizer, clip = build(cfg)
    runner.broadcast(model.variables + optimizer.variables)
    progress = Progress()
    checkpoints = Checkpoints(cfg, runner, model=model, optimizer=optimizer, clip=clip, progress=progress)
    first = checkpoints.restore() if cfg.resume else 0
    announce(cfg, runner, checkpoints, first)

    def replica_fn(x, y, loss_denominator):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / loss_denominator
        return loss, clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables,
                                loss=loss if cfg.detects_spikes else None)

    train_step = runner.compile(replica_fn, cfg.batch_size)
    # Every rank, together (it all-gathers where each replica runs); rank 0 writes the files.
    reporter = distclip.ClipReporter(clip, model.trainable_variables, log_dir=cfg.out, first_step=first,
                                     variable_norms_every=cfg.variable_norms_every,
                                     last_good=lambda: save_at(checkpoints, reporter.next_step))
    bar = keras.utils.Progbar(cfg.steps, stateful_metrics=["norm", "clip"],
                              interval=0.1 if sys.stdout.isatty() else 10.0, verbose=1 if runner.chief else 0)
    start = time.monotonic()
    with StopOnSigterm("distclip train") as sigterm:
        for step in range(first, cfg.steps):
            x, y = adding.batch(cfg.seed, step, cfg.batch_size, cfg.length, nan=step in cfg.nan_at,
                                spike=step in cfg.spike_at)
            # `stop`: whether any rank was sent SIGTERM, agreed on in the step's own loss reduction.
            loss, stop = (float(v.numpy()) for v in train_step(x, y, sigterm.requested))
            row = reporter.report(loss=loss)
            assert row is not None  # no accumulation here: every step is an update
            progress.record(step, loss, bool(row["clipped"]))
            bar.update(step + 1, [("loss", loss), ("norm", row["global_norm"]), ("clip", float(row["clipped"]))])
            if checkpoints.after(step + 1, bool(stop), reporter.flush):
                reporter.close()
                stopped(cfg, runner, checkpoints, step + 1)
        checkpoints.save(cfg.steps)
    reporter.close()
    return finish(cfg, runner, model, optimizer, clip, final_loss=progress.final_loss(),
                  clipped=int(progress.clipped.numpy()), seconds=time.monotonic() - start, rows=reporter.rows,
                  nonfinite=reporter.nonfinite, rewinds=reporter.rewinds)


def save_at(checkpoints: Checkpoints, done: int):
    """Saves the state after `done` steps (every rank, as a SIGTERM checkpoint does); returns the folder the
    chief wrote (None on the other ranks: the folder is the chief's)."""
    checkpoints.save(done)
    return checkpoints.directory if checkpoints.runner.chief else None
