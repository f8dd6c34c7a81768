"""The adding problem (Hochreiter & Schmidhuber, 1997), as Pascanu, Mikolov & Bengio (2013) used it.

Each sequence has `length` steps of two inputs: a value drawn uniformly from
[0, 1], and a marker that is 1 at exactly two steps (one in the first half,
one in the second) and 0 elsewhere. The target is the sum of the two marked
values. Predicting the mean (1.0) gives a mean squared error of about 0.167;
solving it needs gradients carried across the whole sequence, which is what
makes a vanilla RNN's gradients explode (and vanish).
"""
from __future__ import annotations

import keras
import numpy as np


def batch(seed: int, step: int, size: int, length: int, nan: bool = False, spike: bool = False):
    """The global batch for `step`: inputs `[size, length, 2]` float32 and targets `[size, 1]`.

    With `nan`, the last sequence's first value is NaN: the last replica's slice is poisoned.
    With `spike`, the targets are 100 times too large: a loss and gradient spike on every replica.
    """
    rng = np.random.default_rng([seed, step])
    values = rng.uniform(0.0, 1.0, size=(size, length)).astype(np.float32)
    half = length // 2
    first = rng.integers(0, half, size=size)
    second = rng.integers(half, length, size=size)
    markers = np.zeros((size, length), np.float32)
    rows = np.arange(size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    if nan:
        values[-1, 0] = np.nan
    x = np.stack([values, markers], axis=-1)
    y = (values[rows, first] + values[rows, second])[:, None]
    if spike:
        y = y * 100.0
    return x, y.astype(np.float32)


def model(length: int, units: int, seed: int, recurrent_gain: float) -> keras.Model:
    """A vanilla tanh RNN and a linear read-out.

    The recurrent matrix starts orthogonal times `recurrent_gain`: above 1 the
    dynamics expand, and gradients through time can explode.
    """
    return keras.Sequential(
        [
            keras.Input((length, 2)),
            keras.layers.SimpleRNN(
                units,
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                recurrent_initializer=keras.initializers.Orthogonal(gain=recurrent_gain, seed=seed + 1),
            ),
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2)),
        ],
        name="adding_rnn",
    )
