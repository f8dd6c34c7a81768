"""distclip._src.checks: gradients and variables of the wrong shape, type or number are refused, named, with nothing
written."""
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import MODES, call, make_model, make_optimizer, make_wrapper, snapshot, unchanged


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", ["ClipStep", "ClipOptimizer"])
@pytest.mark.parametrize("bad_shape", [(1,), (), (8, 4)], ids=["(1,)", "()", "transposed"])
def test_a_gradient_of_another_shape_is_refused(mode, api, bad_shape):
    model, optimizer = make_model(), make_optimizer("adam")
    wrapper = make_wrapper(api, optimizer)
    wrapper.build(model.trainable_variables)
    good = [tf.ones_like(v.value) for v in model.trainable_variables]
    call(mode, lambda: wrapper.apply(good, model.trainable_variables))  # one real step first
    before = snapshot(model, optimizer, wrapper)
    grads = [tf.ones(bad_shape)] + good[1:]  # for the (4, 8) kernel of the first layer
    with pytest.raises(distclip.ArgumentError,
                       match=r"grads\[0\] has shape .* but trainable_variables\[0\] \(sequential.*/kernel\) has shape \(4, 8\)"):
        call(mode, lambda: wrapper.apply(grads, model.trainable_variables))
    assert unchanged(before, snapshot(model, optimizer, wrapper))


@pytest.mark.parametrize("kwargs, value, match", [
    (dict(low=0.0), 0.0, r"x must be a number > 0.0; got x=0.0"),
    (dict(low=0.0, high=1.0, low_open=False, high_open=True), 1.0, r"x must be a number >= 0.0 and < 1.0; got x=1.0"),
    (dict(low=1, integer=True, low_open=False), 2.5, r"x must be an integer >= 1; got x=2.5"),
    (dict(low=0.0), True, r"got x=True"),
    (dict(low=0.0), float("inf"), r"got x=inf"),
    (dict(low=0.0), "3", r"got x='3'"),
    (dict(low=1.0, rule="None or a finite number > 1"), 1.0, r"x must be None or a finite number > 1; got x=1.0"),
])
def test_one_number_check_names_the_argument_the_rule_and_the_value(kwargs, value, match):
    from distclip._src.checks import check_number

    with pytest.raises(distclip.ArgumentError, match=match):
        check_number("x", value, **kwargs)
    assert check_number("x", 0.5, 0.0, 1.0) == 0.5 and check_number("x", 0, 0, low_open=False, integer=True) == 0
