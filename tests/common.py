"""Tiny models, data and the single-device reference, shared by tests and worker processes.

Everything is made from fixed numpy seeds so any process builds the same
initial weights and the same global batch.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import distclip

GLOBAL_BATCH = 16
FEATURES = 4


def global_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype("float32")
    y = rng.normal(size=(GLOBAL_BATCH, 1)).astype("float32")
    return x, y


def make_model(seed: int = 1) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def make_optimizer(name: str, **kwargs):
    return {"sgd": lambda: keras.optimizers.SGD(0.1, **kwargs),
            "adam": lambda: keras.optimizers.Adam(0.05, **kwargs)}[name]()


def zero_moments_by_hand(optimizer) -> None:
    """What `Rewind(reset_moments=True)` does after a rewind, by hand: Keras's moment slots of Adam (`_momentums`,
    `_velocities`) and SGD (`momentums`), by their Keras names, set to zero."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for name in ("_momentums", "_velocities", "momentums"):
        for v in getattr(inner, name, None) or []:
            v.assign(tf.zeros_like(v))


def lr_factor_by_hand(factor: float, updates: int, ramp: str, j: int) -> np.float32:
    """The learning-rate factor of the j-th applied update after a rewind (j from 1), from `Rewind`'s docstring,
    in float32 numpy."""
    if j > updates:
        return np.float32(1.0)
    if ramp == "step":
        return np.float32(factor)
    return np.float32(factor) + np.float32(1.0 - factor) * np.float32(j - 1) / np.float32(updates)


def reference_train(clip_norm: float, steps: int, opt: str = "adam", batches=None):
    """Single device, mean loss over the global batch, tf.clip_by_global_norm, optimizer.apply."""
    model, optimizer = make_model(), make_optimizer(opt)
    batches = batches or [global_batch(s) for s in range(steps)]

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        grads, norm = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply(grads, model.trainable_variables)
        return norm

    norms = [float(step(*b)) for b in batches]
    return model.get_weights(), norms


def shard(strategy, array):
    """Splits a global-batch array evenly over the strategy's replicas, in replica order."""
    n = strategy.num_replicas_in_sync
    size = array.shape[0] // n
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * size:(ctx.replica_id_in_sync_group + 1) * size])
    )


def distributed_train(strategy, clip_norm, steps, opt="adam", batches=None, mode="clipstep", restore=None,
                      **clip_kwargs):
    """Each replica computes gradients on its shard, then one of three updates (`mode`):
    "clipstep" (distclip.ClipStep), "keras_global_clipnorm" (optimizer.apply with
    Keras's own global_clipnorm), or "unclipped" (plain optimizer.apply).

    `restore(objects)`, if given, runs once everything is built (to load a checkpoint).
    Returns (weights, per-step per-replica norms, per-variable per-replica values, objects).
    """
    assert mode in ("clipstep", "keras_global_clipnorm", "unclipped"), mode
    with strategy.scope():
        model = make_model()
        extra = {"global_clipnorm": clip_norm} if mode == "keras_global_clipnorm" else {}
        optimizer = make_optimizer(opt, **extra)
        clip = distclip.ClipStep(optimizer, clip_norm, **clip_kwargs) if mode == "clipstep" else None
        (clip or optimizer).build(model.trainable_variables)
    if restore is not None:
        restore(dict(model=model, optimizer=optimizer, clip=clip))
    if batches is None:
        batches = [global_batch(s) for s in range(steps)]

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            if clip is None:
                optimizer.apply(grads, model.trainable_variables)
                return tf.constant(0.0)
            result = clip.apply(grads, model.trainable_variables)
            return result.global_norm

        return strategy.run(replica_fn, args=(x, y))

    norms = []
    for x, y in batches:
        out = step(shard(strategy, x), shard(strategy, y))
        norms.append([float(v) for v in strategy.experimental_local_results(out)])
    per_replica = replica_values(strategy, model.trainable_variables)
    return model.get_weights(), norms, per_replica, dict(model=model, optimizer=optimizer, clip=clip, step=step)


def replica_train_step(strategy, model, apply):
    """A traced step(x, y) under `strategy`: each replica's share of the global-batch loss, then
    `apply(grads, variables)` in the replica context."""
    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
            apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        strategy.run(replica_fn, args=(x, y))
    return step


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def replica_values(strategy, variables):
    """Every variable's value on every replica, as numpy arrays: [[replica0, replica1, ...], ...]."""
    out = []
    for v in variables:
        v = v.value if isinstance(v, keras.Variable) else v
        out.append([np.array(x) for x in strategy.experimental_local_results(v)])
    return out


def check_multiworker_outputs(outs, clip_norm, steps):
    """The JSON files of 2 workers/multiworker_train.py runs: equal to the reference and to each other."""
    import json

    import pytest

    ref_weights, ref_norms = reference_train(clip_norm, steps, "adam")
    got = [json.loads(o.read_text()) for o in outs]
    assert sorted(g["task"] for g in got) == [0, 1]
    for g in got:
        weights = [np.array(w, "float32") for w in g["weights"]]
        assert max_abs_diff(weights, ref_weights) <= 1e-5
        assert [n[0] for n in g["norms"]] == pytest.approx(ref_norms, rel=1e-5)
        assert all(n > clip_norm for n in ref_norms)
    # Both workers hold the same weights and saw the same norms, bit for bit; verify_replicas agreed.
    assert got[0]["weights"] == got[1]["weights"]
    assert got[0]["norms"] == got[1]["norms"]
    assert got[0]["checksums"] == got[1]["checksums"]


def train_single(strategy, clip_norm, steps=3, use_pairs=False):
    """ClipStep (through `apply`, or `apply_gradients` with `use_pairs`) under `strategy`: (weights, norms)."""
    with strategy.scope():
        model, opt = make_model(), make_optimizer("adam")
        step = distclip.ClipStep(opt, clip_norm)

    @tf.function
    def train(x, y):
        def fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            if use_pairs:
                return step.apply_gradients(zip(grads, model.trainable_variables)).global_norm
            return step.apply(grads, model.trainable_variables).global_norm
        return strategy.run(fn, args=(x, y))

    norms = [float(train(*global_batch(s))) for s in range(steps)]
    return model.get_weights(), norms


# Bad input changes nothing: a snapshot of everything a step could write, compared after a refused call.
MODES = ["eager", "traced"]


def snapshot(model, optimizer, wrapper):
    return [np.array(v) for v in model.get_weights()] + [np.array(v.numpy()) for v in optimizer.variables] + [
        np.array(wrapper.skipped_steps.numpy())]


def unchanged(before, after):
    return len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


def make_wrapper(api, optimizer, clip_norm=1.0, **options):
    """`ClipStep` or `ClipOptimizer` (by `api`) around `optimizer`."""
    cls = distclip.ClipStep if api == "ClipStep" else distclip.keras.ClipOptimizer
    return cls(optimizer, clip_norm, **options)


def call(mode, fn):
    return fn() if mode == "eager" else tf.function(fn)()


def read_tensorboard(folder) -> dict:
    """{tag: [(step, value), ...]} of the scalars in the TensorBoard event files under `folder`, in step order."""
    import glob
    import os

    scalars: dict = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name not in ("", "scalars"):
                    continue  # text, histograms
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return {tag: sorted(points) for tag, points in scalars.items()}
