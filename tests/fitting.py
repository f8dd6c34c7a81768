"""`model.fit` with and without ClipOptimizer on the tiny model, and its single-device reference."""
from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

import distclip
from common import GLOBAL_BATCH, global_batch, make_model, max_abs_diff, reference_train

CLIP = 0.3
STEPS = 4


def data(steps=STEPS):
    xs, ys = zip(*(global_batch(s) for s in range(steps)))
    return np.concatenate(xs), np.concatenate(ys)


def fit(optimizer_fn, strategy=None, steps=STEPS, x=None, y=None, model=None, log_dir=None, batch_size=GLOBAL_BATCH,
        **compile_kwargs):
    """`fit` over `steps` global batches of 16, in order; returns (model, optimizer, history)."""
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = model or make_model()
        optimizer = optimizer_fn()
        model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    if x is None:
        x, y = data(steps)
    callbacks = [distclip.keras.ClipLogger(log_dir)] if isinstance(optimizer, distclip.keras.ClipOptimizer) else []
    history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return model, optimizer, history.history


def clip_adam(clip_norm=CLIP, **kwargs):
    return lambda: distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), clip_norm, **kwargs)


def keras_adam(**kwargs):
    return lambda: keras.optimizers.Adam(0.05, **kwargs)


@functools.lru_cache(maxsize=None)
def reference():
    """Single-device fit with Keras's global_clipnorm (correct on one device): (weights, norms)."""
    model, _, _ = fit(keras_adam(global_clipnorm=CLIP))
    weights, norms = reference_train(CLIP, STEPS, "adam")
    assert max_abs_diff(model.get_weights(), weights) <= 1e-6, "the two single-device references agree"
    assert min(norms) > CLIP, "the threshold binds on every step"
    return weights, norms
