"""Bad input gets an ArgumentError before the first variable is written, eagerly and traced;
thresholds are checked in float32; finite gradients have a finite norm whenever it fits in float32."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import make_model, make_optimizer

MODES = ["eager", "traced"]


def _snapshot(model, optimizer, wrapper):
    return [np.array(v) for v in model.get_weights()] + [np.array(v.numpy()) for v in optimizer.variables] + [
        np.array(wrapper.skipped_steps.numpy())]


def _unchanged(before, after):
    return len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


def _make(api, optimizer):
    return distclip.ClipStep(optimizer, 1.0) if api == "ClipStep" else distclip.keras.ClipOptimizer(optimizer, 1.0)


def _call(mode, fn):
    return fn() if mode == "eager" else tf.function(fn)()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", ["ClipStep", "ClipOptimizer"])
@pytest.mark.parametrize("bad_shape", [(1,), (), (8, 4)], ids=["(1,)", "()", "transposed"])
def test_a_gradient_of_another_shape_is_refused(mode, api, bad_shape):
    model, optimizer = make_model(), make_optimizer("adam")
    wrapper = _make(api, optimizer)
    wrapper.build(model.trainable_variables)
    good = [tf.ones_like(v.value) for v in model.trainable_variables]
    _call(mode, lambda: wrapper.apply(good, model.trainable_variables))  # one real step first
    before = _snapshot(model, optimizer, wrapper)
    grads = [tf.ones(bad_shape)] + good[1:]  # for the (4, 8) kernel of the first layer
    with pytest.raises(distclip.ArgumentError,
                       match=r"grads\[0\] has shape .* but trainable_variables\[0\] \(sequential.*/kernel\) has shape \(4, 8\)"):
        _call(mode, lambda: wrapper.apply(grads, model.trainable_variables))
    assert _unchanged(before, _snapshot(model, optimizer, wrapper))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", ["ClipStep", "ClipOptimizer"])
def test_variables_the_optimizer_was_not_built_for_are_refused(mode, api):
    model, optimizer = make_model(), make_optimizer("adam")
    variables = model.trainable_variables
    optimizer.build(variables[:2])  # built for the first layer only
    wrapper = _make(api, optimizer)
    if api == "ClipOptimizer":
        wrapper.build(variables[:2])
    before = _snapshot(model, optimizer, wrapper)
    grads = [tf.ones_like(v.value) for v in variables]
    with pytest.raises(distclip.ArgumentError, match=r"trainable_variables\[2\] \(sequential.*/kernel\) is not one of "
                                                      r"the 2 variables Adam was built for"):
        _call(mode, lambda: wrapper.apply(grads, variables))
    assert _unchanged(before, _snapshot(model, optimizer, wrapper))


@pytest.mark.parametrize("mode", MODES)
def test_one_clipstep_for_a_second_model_is_refused(mode):
    first, second, optimizer = make_model(), make_model(seed=2), make_optimizer("sgd")
    step = distclip.ClipStep(optimizer, 1.0)
    _call(mode, lambda: step.apply([tf.ones_like(v.value) for v in first.trainable_variables],
                                   first.trainable_variables))
    before = _snapshot(second, optimizer, step) + [np.array(w) for w in first.get_weights()]
    with pytest.raises(distclip.ArgumentError, match="serves one set of variables; create new ones for another model"):
        _call(mode, lambda: step.apply([tf.ones_like(v.value) for v in second.trainable_variables],
                                       second.trainable_variables))
    assert _unchanged(before, _snapshot(second, optimizer, step) + [np.array(w) for w in first.get_weights()])


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


@pytest.mark.parametrize("engine", ["none", "mirrored"])
def test_finite_gradients_near_the_float32_limit_clip_instead_of_skipping(mirrored, engine):
    rng = np.random.default_rng(3)
    full = [rng.normal(size=(4, 3)) * 1e20, rng.normal(size=(3,)) * 3e19]  # squares overflow float32
    want_norm = np.sqrt(sum((g.astype(np.float32).astype(np.float64) ** 2).sum() for g in full))
    assert np.isfinite(want_norm) and want_norm < np.finfo(np.float32).max
    strategy = mirrored if engine == "mirrored" else tf.distribute.get_strategy()
    n = strategy.num_replicas_in_sync
    with strategy.scope():
        variables = [keras.Variable(np.zeros(g.shape, "float32")) for g in full]
        step = distclip.ClipStep(keras.optimizers.SGD(1.0), 2.0)
        step.build(variables)

    @tf.function
    def run(*grads):
        def replica_fn(*grads):
            r = step.apply(list(grads), variables)
            return r.global_norm, r.finite
        return strategy.run(replica_fn, args=grads)

    per = [strategy.experimental_distribute_values_from_function(
        lambda ctx, g=g: tf.constant((g / n).astype("float32"))) for g in full] if n > 1 else \
        [tf.constant(g.astype("float32")) for g in full]
    norm, finite = run(*per)
    norm, finite = (strategy.experimental_local_results(x)[0] for x in (norm, finite))
    assert bool(finite) and int(step.skipped_steps.numpy()) == 0
    assert float(norm) == pytest.approx(want_norm, rel=1e-5)
    # The update is the float64 reference's: -lr * g * clip_norm / norm.
    for v, g in zip(variables, full):
        np.testing.assert_allclose(v.numpy(), -g * 2.0 / want_norm, rtol=1e-5, atol=1e-6)
