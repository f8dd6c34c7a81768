"""`distclip train --fit`: the same job through `model.compile`/`model.fit` with `distclip.keras`."""
from __future__ import annotations

import time

import keras

from distclip import NoiseScale
from distclip.keras import BroadcastCallback, ClipLogger, ClipOptimizer
from distclip.train import adding
from distclip.train.checkpoint import Checkpoints, Progress, StopOnSigterm, announce, stopped
from distclip.train.config import Config
from distclip.train.summary import finish


class AddingBatches(keras.utils.PyDataset):
    """Steps `first`.. of the adding problem, as `distclip train` draws them; this rank's slice under Horovod."""

    def __init__(self, cfg: Config, rows: slice, first: int = 0):
        super().__init__()
        self.cfg, self.rows, self.first = cfg, rows, first

    def __len__(self) -> int:
        return self.cfg.steps - self.first

    def __getitem__(self, i: int):
        step = self.first + i
        x, y = adding.batch(self.cfg.seed, step, self.cfg.batch_size, self.cfg.length, nan=step in self.cfg.nan_at,
                            spike=step in self.cfg.spike_at)
        return x[self.rows], y[self.rows]


def run(cfg: Config, runner) -> dict:
    """Trains per `cfg` with `model.fit` and `ClipOptimizer`; returns the summary, the same on every rank.

    One epoch of the remaining steps, so the batches are those of the custom
    loop (and so are the norms). Each step's loss is that step's alone: the
    loss tracker whose mean `fit` logs is reset after every step (so a NaN step
    does not make every later loss NaN), averaged over ranks under Horovod.
    `final_loss` is the mean of the finite ones over the last `min(100, steps)`
    steps, as in the custom loop. Checkpoints, SIGTERM and `--resume` as in the custom loop
    (`distclip.train.checkpoint`).
    """
    with runner.scope():
        model = adding.model(cfg.length, cfg.units, cfg.seed, cfg.recurrent_gain)
        optimizer = ClipOptimizer(keras.optimizers.SGD(cfg.learning_rate, momentum=0.9), cfg.threshold(),
                                  nonfinite=cfg.nonfinite, variable_norms=cfg.variable_norms_every > 0,
                                  noise_scale=NoiseScale(cfg.batch_size) if cfg.noise_scale else None,
                                  rewind=cfg.rewind_config(), skip_spikes=cfg.skip_spikes_config(),
                                  agc=cfg.agc_config())
        model.compile(optimizer=optimizer, loss="mse")
        optimizer.build(model.trainable_variables)
    progress = Progress()
    checkpoints = Checkpoints(cfg, runner, model=model, optimizer=optimizer, progress=progress)
    first = checkpoints.restore() if cfg.resume else 0
    announce(cfg, runner, checkpoints, first)
    logger = ClipLogger(cfg.out, initial_step=first, variable_norms_every=cfg.variable_norms_every)
    data = AddingBatches(cfg, runner.local_rows(cfg.batch_size), first)
    start = time.monotonic()
    with StopOnSigterm("distclip train") as sigterm:
        keeper = _Checkpointing(runner, checkpoints, progress, logger, sigterm, first)
        model.fit(data, epochs=1, shuffle=False, verbose=1 if runner.chief else 0,
                  callbacks=[BroadcastCallback(), logger, keeper])
        if keeper.stopped_after is not None:
            stopped(cfg, runner, checkpoints, keeper.stopped_after)
        checkpoints.save(cfg.steps)
    elapsed = time.monotonic() - start
    return finish(cfg, runner, model, optimizer, optimizer, final_loss=progress.final_loss(),
                  clipped=int(progress.clipped.numpy()), seconds=elapsed, rows=logger.rows,
                  nonfinite=logger.nonfinite, rewinds=logger.rewinds)


class _Checkpointing(keras.callbacks.Callback):
    """Per step: the loop's progress (each step's loss from `fit`'s running means), a checkpoint every
    `--checkpoint-every` steps, and on SIGTERM (agreed by every rank) a checkpoint and the end of `fit`."""

    def __init__(self, runner, checkpoints: Checkpoints, progress: Progress, logger: ClipLogger,
                 sigterm: StopOnSigterm, first: int):
        super().__init__()
        self.runner, self.checkpoints, self.progress = runner, checkpoints, progress
        self.logger, self.sigterm, self.first = logger, sigterm, first
        self.clipped = 0
        self.stopped_after = None

    def on_train_begin(self, logs=None) -> None:
        # The Mean that `fit` logs as "loss" (Keras 3 puts it first in model.metrics, named "loss").
        self.tracker = next(m for m in self.model.metrics if m.name == "loss")

    def on_train_batch_end(self, batch, logs=None) -> None:
        step = self.first + batch
        loss = float(logs["loss"])  # this step's own: the tracker is reset after each step (below)
        self.tracker.reset_state()
        # This rank's loss (under Horovod) averaged over ranks; whether any rank was sent SIGTERM.
        loss, stop = self.runner.agree(loss, self.sigterm.requested)
        clipped, self.clipped = self.logger.clipped_steps - self.clipped, self.logger.clipped_steps
        self.progress.record(step, loss, bool(clipped))
        if self.checkpoints.after(step + 1, stop, self.logger.flush):
            self.stopped_after = step + 1
            self.model.stop_training = True
