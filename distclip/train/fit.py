"""`distclip train --fit`: the same job through `model.compile`/`model.fit` with `distclip.keras`."""
from __future__ import annotations

import time

import keras
import numpy as np

from distclip.keras import BroadcastCallback, ClipLogger, ClipOptimizer
from distclip.train import adding
from distclip.train.config import Config

NO_CLIP = float(np.finfo(np.float32).max)


class AddingBatches(keras.utils.PyDataset):
    """Step i's batch of the adding problem, as `distclip train` draws it; this rank's slice under Horovod."""

    def __init__(self, cfg: Config, rows: slice):
        super().__init__()
        self.cfg, self.rows = cfg, rows

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, i: int):
        x, y = adding.batch(self.cfg.seed, i, self.cfg.batch_size, self.cfg.length)
        return x[self.rows], y[self.rows]


def run_fit(cfg: Config, engine) -> dict:
    """Trains per `cfg` with `model.fit` and `ClipOptimizer`; returns the summary, the same on every rank.

    One epoch of `cfg.steps` steps, so the batches are those of the custom loop
    (and so are the norms). `final_loss` is `fit`'s mean training MSE over the
    last `min(100, steps)` steps, taken from `ClipLogger`'s running means.
    """
    from distclip.train.loop import finish  # loop imports this module lazily, so this import is lazy too

    if cfg.resume:
        raise SystemExit("distclip train --fit: --resume is not supported yet (checkpoints are written by the "
                         "custom loop, without --fit); see the README's Preemption section")
    if engine.name == "MultiWorkerMirroredStrategy":
        raise SystemExit(
            "distclip train --fit: Keras 3's model.fit fails under MultiWorkerMirroredStrategy before it reaches "
            "the optimizer (keras-team/keras#20585); use the custom loop (without --fit) or --strategy horovod"
        )
    with engine.scope():
        model = adding.model(cfg.length, cfg.units, cfg.seed, cfg.recurrent_gain)
        optimizer = ClipOptimizer(
            keras.optimizers.SGD(cfg.learning_rate, momentum=0.9),
            NO_CLIP if cfg.clip_norm is None else cfg.clip_norm,
            nonfinite="propagate" if cfg.clip_norm is None else "skip",
        )
        model.compile(optimizer=optimizer, loss="mse")
    logger = ClipLogger(cfg.out if engine.chief else None)
    losses = _RunningLoss()
    data = AddingBatches(cfg, engine.local_rows(cfg.batch_size))
    start = time.monotonic()
    model.fit(data, epochs=1, shuffle=False, verbose=1 if engine.chief else 0,
              callbacks=[BroadcastCallback(), logger, losses])
    elapsed = time.monotonic() - start
    return finish(cfg, engine, model, optimizer, final_loss=engine.mean(losses.tail_mean(100)), clipped=logger.clipped_steps,
                  skipped=engine.read(optimizer.skipped_steps), seconds=elapsed,
                  rows=logger.rows if engine.chief else None)


class _RunningLoss(keras.callbacks.Callback):
    """`fit`'s running epoch means of the loss, from which the mean over the last steps follows."""

    def __init__(self):
        super().__init__()
        self.means = []

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.means.append(float(logs["loss"]))

    def tail_mean(self, n: int) -> float:
        m = self.means
        k = min(n, len(m))
        if k == len(m):
            return m[-1]
        # mean of the last k steps = (len*m_last - (len-k)*m_(len-k-1)) / k
        return (len(m) * m[-1] - (len(m) - k) * m[-k - 1]) / k
