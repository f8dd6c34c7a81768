"""distclip._src.threshold: what clip_norm may be (numbers, tensors, variables, schedules, None), checked before anything
is written."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import (GLOBAL_BATCH, distributed_train, global_batch, make_model, make_optimizer, make_wrapper,
                    max_abs_diff, reference_train, shard, train_single)


G = [tf.constant([3.0, 4.0])]


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "1.0", [1.0]])
def test_bad_clip_norm_values(bad):
    with pytest.raises(ValueError, match="clip_norm") as info:
        distclip.sync_and_clip(G, bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


@pytest.mark.parametrize("bad", [tf.constant(0.0), tf.constant(-2.0), tf.constant(float("nan")), tf.Variable(float("inf"))])
def test_bad_clip_norm_tensors(bad):
    with pytest.raises(ValueError, match="clip_norm"):
        distclip.sync_and_clip(G, bad)


def test_bad_clip_norm_tensor_shape_and_dtype():
    with pytest.raises(ValueError, match="clip_norm.*shape"):
        distclip.sync_and_clip(G, tf.constant([1.0, 2.0]))
    with pytest.raises(ValueError, match="clip_norm.*string"):
        distclip.sync_and_clip(G, tf.constant("1"))


def test_bad_clip_norm_rejected_by_clipstep_at_construction():
    with pytest.raises(ValueError, match=r"clip_norm=-3"):
        distclip.ClipStep(make_optimizer("sgd"), -3)


def test_bad_clip_norm_variable_fails_in_graph_before_anything_is_applied():
    model, opt = make_model(), make_optimizer("sgd")
    threshold = tf.Variable(1.0)
    step = distclip.ClipStep(opt, threshold)
    x, y = np.ones((2, 4), "float32"), np.ones((2, 1), "float32")

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        return step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables).global_norm

    train()
    before = [w.copy() for w in model.get_weights()] + [np.array(v) for v in opt.variables]
    threshold.assign(-1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="clip_norm must be a positive finite number"):
        train()
    after = model.get_weights() + [np.array(v) for v in opt.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_schedule_without_step_is_an_error():
    with pytest.raises(ValueError, match="clip_norm is a schedule.*step="):
        distclip.sync_and_clip(G, lambda step: 1.0)


def test_tensor_and_variable_thresholds():
    ref, _ = reference_train(0.2, 3)
    for threshold in (tf.constant(0.2), tf.Variable(0.2), np.float32(0.2)):
        weights, _ = train_single(tf.distribute.get_strategy(), threshold)
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


@pytest.mark.parametrize("clip_norm, shown, why", [
    (1e-45, "1e-45", "which is 0 (below float32's smallest normal number, 1.2e-38) in float32"),
    (1e-39, "1e-39", "which is 0 (below float32's smallest normal number"),
    (1e39, "1e+39", "which is inf in float32"),
    (10 ** 400, "1000000000", "beyond any float"),
    (tf.constant(1e-300, tf.float64), "1e-300", "which is 0 (below"),
    (np.float64(5e38), "5e+38", "which is inf in float32"),
])
def test_thresholds_are_checked_in_float32_and_shown_as_given(clip_norm, shown, why):
    for make in (lambda: distclip.ClipStep(make_optimizer("sgd"), clip_norm),
                 lambda: distclip.keras.ClipOptimizer(make_optimizer("sgd"), clip_norm),
                 lambda: distclip.sync_and_clip([tf.ones([2])], clip_norm)):
        with pytest.raises(distclip.ArgumentError, match="clip_norm") as info:
            make()
        assert f"clip_norm={shown}" in str(info.value) and why in str(info.value), str(info.value)


def test_clip_norm_none_synchronizes_and_reports_but_never_clips(mirrored):
    huge = [tf.constant([3e3, 4e3])]
    r = distclip.sync_and_clip(huge, None)
    assert float(r.global_norm) == 5e3 and float(r.scale) == 1.0 and not bool(r.clipped) and bool(r.finite)
    assert r.grads[0].numpy().tolist() == [3e3, 4e3]
    # Under MirroredStrategy: the replicas' gradients are summed (synchronized), not clipped.
    weights, norms, per_replica, _ = distributed_train(mirrored, None, 3, "adam")
    ref_weights, ref_norms = reference_train(1e30, 3, "adam")  # a threshold that never binds: plain training
    assert max_abs_diff(weights, ref_weights) <= 1e-5
    assert [n[0] for n in norms] == pytest.approx(ref_norms, rel=1e-5) and min(ref_norms) > 0.2
    for values in per_replica:
        assert all(np.array_equal(values[0], v) for v in values[1:])


@pytest.mark.parametrize("api", ["ClipStep", "ClipOptimizer"])
def test_clip_norm_none_logs_an_infinite_threshold_and_skips_nonfinite_steps(api):
    model, opt = make_model(), make_optimizer("sgd")
    wrapper = make_wrapper(api, opt, None)
    grads = [tf.ones_like(v) * 1e3 for v in model.trainable_variables]
    r = wrapper.apply(grads, model.trainable_variables)
    assert bool(r.finite) and not bool(r.clipped) and float(r.scale) == 1.0
    assert int(opt.iterations.numpy()) == 1
    if api == "ClipOptimizer":
        assert float(wrapper.clip_norm_used.numpy()) == float("inf")
        assert wrapper.get_config()["clip_norm"] is None
        assert distclip.keras.ClipOptimizer.from_config(wrapper.get_config()).clip_norm is None
    before = model.get_weights()
    wrapper.apply([g * float("nan") for g in grads], model.trainable_variables)  # nonfinite="skip" still applies
    assert max_abs_diff(model.get_weights(), before) == 0.0 and int(wrapper.skipped_steps.numpy()) == 1


def test_spikeclip_without_an_initial_threshold_does_not_clip_while_warming_up():
    r = distclip.ClipStep(make_optimizer("sgd"), distclip.SpikeClip(warmup=5))
    model = make_model()
    result = r.apply([tf.ones_like(v) * 1e6 for v in model.trainable_variables], model.trainable_variables)
    assert float(result.scale) == 1.0 and not bool(result.clipped)
