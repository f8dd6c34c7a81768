"""Every single-process context, every kind of threshold, and the reduction/backend options."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import GLOBAL_BATCH, global_batch, make_model, make_optimizer, max_abs_diff, reference_train, shard


def _train_single(strategy, clip_norm, steps=3, use_pairs=False):
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


@pytest.mark.parametrize("context", ["none", "default", "one_device"])
def test_single_replica_contexts_match_reference(context):
    strategy = {
        "none": tf.distribute.get_strategy(),
        "default": tf.distribute.get_strategy(),
        "one_device": tf.distribute.OneDeviceStrategy("/cpu:0"),
    }[context]
    if context == "none":
        # No strategy at all: no scope, call directly.
        model, opt = make_model(), make_optimizer("adam")
        step = distclip.ClipStep(opt, 0.2)
        for s in range(3):
            x, y = global_batch(s)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        weights = model.get_weights()
    else:
        weights, _ = _train_single(strategy, 0.2, use_pairs=context == "default")
    ref, _ = reference_train(0.2, 3)
    assert max_abs_diff(weights, ref) <= 1e-6


def test_tensor_and_variable_thresholds():
    ref, _ = reference_train(0.2, 3)
    for threshold in (tf.constant(0.2), tf.Variable(0.2), np.float32(0.2)):
        weights, _ = _train_single(tf.distribute.get_strategy(), threshold)
        assert max_abs_diff(weights, ref) <= 1e-6


def test_variable_threshold_can_change_between_steps():
    threshold = tf.Variable(1000.0)
    model, opt = make_model(), make_optimizer("sgd")
    step = distclip.ClipStep(opt, threshold)
    x, y = global_batch()

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        r = step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return r.global_norm, r.scale, r.clipped

    norm, scale, clipped = train()
    assert float(scale) == 1.0 and not bool(clipped)
    threshold.assign(0.1)
    norm, scale, clipped = train()
    assert bool(clipped) and float(scale) == pytest.approx(0.1 / float(norm), rel=1e-6)


def test_schedule_threshold_follows_optimizer_iterations(mirrored):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.5)
    with mirrored.scope():
        model, opt = make_model(), make_optimizer("sgd")
        step = distclip.ClipStep(opt, schedule)

    @tf.function
    def train(x, y):
        def fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
            r = step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return r.global_norm * r.scale
        return mirrored.run(fn, args=(x, y))

    x, y = global_batch()
    for i in range(3):
        applied = [float(v) for v in mirrored.experimental_local_results(train(shard(mirrored, x), shard(mirrored, y)))]
        assert applied[0] == applied[1] == pytest.approx(0.5 * 0.5 ** i, rel=1e-5)

    # Plain callables too, with sync_and_clip's step argument.
    r = distclip.sync_and_clip([tf.constant([3.0, 4.0])], lambda s: 1.0 / (1.0 + tf.cast(s, tf.float32)), step=tf.constant(3))
    assert float(r.scale) == pytest.approx(0.25 / 5.0)


def test_reduction_mean_and_backend_none(mirrored):
    per = [np.array([3.0, 4.0], "float32"), np.array([6.0, 8.0], "float32")]
    dist = mirrored.experimental_distribute_values_from_function(lambda c: tf.constant(per[c.replica_id_in_sync_group]))

    def norms(**kw):
        out = mirrored.run(tf.function(lambda g: distclip.sync_and_clip([g], 1.0, **kw).global_norm), args=(dist,))
        return [float(v) for v in mirrored.experimental_local_results(out)]

    assert norms() == pytest.approx([15.0, 15.0])                      # SUM: [9, 12]
    assert norms(reduction="mean") == pytest.approx([7.5, 7.5])        # MEAN: [4.5, 6]
    assert norms(backend="tf_distribute", reduction="sum") == pytest.approx([15.0, 15.0])
    assert norms(backend="none") == pytest.approx([5.0, 10.0])         # already-synchronized: no collective


def test_result_is_a_namedtuple_usable_in_tf_function():
    @tf.function
    def f(g):
        return distclip.sync_and_clip([g], 2.0)

    r = f(tf.constant([3.0, 4.0]))
    assert isinstance(r, distclip.ClipResult)
    assert r._fields == ("grads", "global_norm", "scale", "clipped", "finite")
    assert float(r.global_norm) == 5.0 and float(r.scale) == pytest.approx(0.4)
    assert bool(r.clipped) and bool(r.finite)
    np.testing.assert_allclose(r.grads[0].numpy(), [1.2, 1.6], rtol=1e-6)
    zero = distclip.sync_and_clip([tf.zeros([3])], 1.0)
    assert float(zero.scale) == 1.0 and not bool(zero.clipped)
    skipped = distclip.sync_and_clip([tf.constant([1.0, np.inf])], 1.0)
    assert float(skipped.scale) == 0.0 and not bool(skipped.finite)
    assert np.array_equal(skipped.grads[0].numpy(), [0.0, 0.0])


def test_sparse_as_dense_and_fp16_compression(mirrored):
    """Densified slices join the packed all-reduce; fp16 travels, the norm is of the decompressed values."""
    per = [np.array([3.0, 4.0], "float32"), np.array([6.0, 8.0], "float32")]
    dense = mirrored.experimental_distribute_values_from_function(lambda c: tf.constant(per[c.replica_id_in_sync_group]))
    rows = mirrored.experimental_distribute_values_from_function(
        lambda c: tf.constant([[1.0, 2.0]]) if c.replica_id_in_sync_group == 0 else tf.constant([[3.0, -2.0]]))

    def run(**kw):
        def fn(d, v):
            r = distclip.sync_and_clip([d, tf.IndexedSlices(v, tf.constant([1]), tf.constant([3, 2]))], 100.0, **kw)
            sparse = isinstance(r.grads[1], tf.IndexedSlices)
            assert sparse != kw.get("sparse_as_dense", False)
            assert r.grads[0].dtype == tf.float32 and (r.grads[1].values if sparse else r.grads[1]).dtype == tf.float32
            return r.global_norm

        out = tf.function(lambda d, v: mirrored.run(fn, args=(d, v)))(dense, rows)
        return [float(n) for n in mirrored.experimental_local_results(out)]

    want = np.sqrt(9.0 ** 2 + 12.0 ** 2 + 4.0 ** 2 + 0.0 ** 2)  # dense sum [9, 12]; row 1 sums to [4, 0]
    for kw in ({}, {"sparse_as_dense": True}, {"compression": "fp16"}):
        assert run(**kw) == pytest.approx([want, want], rel=1e-6), kw
    with pytest.raises(ValueError, match="compression=.zip."):
        distclip.sync_and_clip([tf.constant([1.0])], 1.0, compression="zip")
