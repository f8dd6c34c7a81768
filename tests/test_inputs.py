"""Bad input gets a clear error naming the argument and the value, and changes nothing."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import make_model, make_optimizer

G = [tf.constant([3.0, 4.0])]


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, None, "1.0", [1.0]])
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


@pytest.mark.parametrize(
    "grads, match",
    [
        ([], "grads is empty"),
        ([None, None], "every entry of grads is None"),
        (tf.constant([1.0]), "grads must be a list"),
        ("abc", "grads must be a list"),
        ([tf.constant([1, 2])], r"grads\[0\] has dtype int32"),
        ([tf.constant([1.0]), "x"], r"grads\[1\]"),
    ],
)
def test_bad_gradients(grads, match):
    with pytest.raises(ValueError, match=match):
        distclip.sync_and_clip(grads, 1.0)


@pytest.mark.parametrize("kwarg, value", [("nonfinite", "ignore"), ("reduction", "max"), ("backend", "nccl"), ("nonfinite", None)])
def test_bad_choices(kwarg, value):
    with pytest.raises(ValueError, match=f"{kwarg} must be one of .*{kwarg}={value!r}"):
        distclip.sync_and_clip(G, 1.0, **{kwarg: value})
    with pytest.raises(ValueError, match=f"{kwarg}={value!r}"):
        distclip.ClipStep(make_optimizer("sgd"), 1.0, **{kwarg: value})


def test_mismatched_lists_change_nothing():
    model, opt = make_model(), make_optimizer("sgd")
    step = distclip.ClipStep(opt, 1.0)
    before = model.get_weights()
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="4 gradients for 3 variables"):
        step.apply(grads, model.trainable_variables[:3])
    with pytest.raises(ValueError, match=r"grads_and_vars\[0\] is not a \(gradient, variable\) pair"):
        step.apply_gradients([(grads[0],)])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert int(opt.iterations.numpy()) == 0


def test_optimizer_checks():
    with pytest.raises(TypeError, match="optimizer must be a Keras 3 optimizer"):
        distclip.ClipStep(tf.Module(), 1.0)
    with pytest.raises(ValueError, match="global_clipnorm=0.5"):
        distclip.ClipStep(keras.optimizers.SGD(global_clipnorm=0.5), 1.0)
    # A LossScaleOptimizer is supported (its overflowing steps skipped), not with nonfinite="propagate",
    # nor around an optimizer that clips by itself.
    distclip.ClipStep(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), 1.0)
    with pytest.raises(ValueError, match="LossScaleOptimizer.*nonfinite='propagate'"):
        distclip.ClipStep(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), 1.0, nonfinite="propagate")
    with pytest.raises(ValueError, match="clipnorm=1.0"):
        distclip.ClipStep(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(clipnorm=1.0)), 1.0)


def test_cross_replica_context_is_an_error(mirrored):
    with mirrored.scope():
        with pytest.raises(distclip.ContextError, match=r"cross-replica context .* call it inside the replica function: strategy.run"):
            distclip.sync_and_clip(G, 1.0)


def test_clipstep_from_another_strategy_is_an_error(mirrored):
    model, opt = make_model(), make_optimizer("sgd")
    step = distclip.ClipStep(opt, 1.0)  # created outside the scope
    grads = [tf.ones_like(v) for v in model.trainable_variables]

    def replica_fn():
        return step.apply(grads, model.trainable_variables).global_norm

    with pytest.raises(distclip.ContextError, match=r"strategy.scope\(\)"):
        mirrored.run(tf.function(replica_fn))
