"""distclip._src.optimizer: Keras as the oracle. Every optimizer keras.optimizers exports, through ClipStep and ClipOptimizer
(built beforehand and built lazily), equals its own `apply` on one device after `tf.clip_by_global_norm`; what
distclip cannot run as the optimizer's own step is refused by name.

No strategy and MirroredStrategy run here; 2-process MultiWorkerMirroredStrategy and `horovodrun -np 2` run the same
cases in tests/scenarios/test_contract_across_processes.py. See tests/contract.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
import distclip
from common import MODES, call, make_model, make_optimizer, make_wrapper, snapshot, unchanged


BACKENDS = ("none", "mirrored")


def _backend(name, mirrored):
    return {} if name == "none" else dict(strategy=mirrored, replicas=2)


def test_every_exported_optimizer_is_a_case():
    names = contract.exported()
    # Found at run time: a class a later Keras exports joins the cases without an edit here.
    assert {"Adam", "Nadam", "Muon", "MultiOptimizer", "LossScaleOptimizer", "ScheduleFreeAdamW"} <= set(names)
    assert "Optimizer" not in names
    for name in names:
        assert isinstance(contract.factory(name)(), keras.optimizers.Optimizer), name


#: Optimizers checked in every variant (the fast tier: all but built beforehand on one device).
EVERY_VARIANT = ("Adam",)


def _matrix():
    """(optimizer, API, built lazily or not, backend): every combination but the built-beforehand one-device ones
    outside EVERY_VARIANT. The fast tier runs each optimizer once under
    MirroredStrategy, built lazily, through ClipStep and ClipOptimizer in turn, and EVERY_VARIANT in the six
    variants but built beforehand on one device (the build path is backend-independent: mirrored runs it); the rest
    of the matrix is marked `slow` (the scenario tier also runs every optimizer across processes,
    tests/scenarios/test_contract_across_processes.py)."""
    names = sorted({n for n, _, _ in contract.all_cases()})
    params = []
    for name, api, lazy in contract.all_cases():
        for backend in BACKENDS:
            fast = (name in EVERY_VARIANT and (lazy or backend == "mirrored")) or (
                backend == "mirrored" and lazy and api == contract.APIS[names.index(name) % len(contract.APIS)])
            if not (name in EVERY_VARIANT or lazy or backend == "mirrored"):
                continue  # built beforehand, one device: the build path is backend-independent (mirrored runs it)
            params.append(pytest.param(name, api, lazy, backend, id=f"{name}-{api}-{'lazy' if lazy else 'built'}-{backend}",
                                       marks=() if fast else pytest.mark.slow))
    return params


@pytest.mark.parametrize("name,api,lazy,backend", _matrix())
def test_equals_the_optimizers_own_apply(mirrored, backend, name, api, lazy):
    found, _ = contract.check_case(name, api, lazy, **_backend(backend, mirrored))
    assert not found, found


# Features of `optimizer.apply` that come with the optimizer's own code.
FEATURES = {
    "ema": lambda: keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9),
    "ema_overwrite": lambda: keras.optimizers.Nadam(0.05, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
}


@pytest.fixture
def features(monkeypatch):
    for key, make in FEATURES.items():
        monkeypatch.setitem(contract.FACTORIES, key, make)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", contract.APIS)
def test_ema_and_variable_constraints_work(mirrored, features, backend, api):
    found, (variables, optimizer, *_) = contract.check_case("ema", api, True, constrained=True,
                                                            **_backend(backend, mirrored))
    assert not found, found
    # The constraint bound: some kernel entries sit at exactly 0 (NonNeg), and the EMA moved.
    assert any((v.numpy() == 0).any() for v in variables if "kernel" in v.name)
    assert any(not np.array_equal(a.numpy(), v.numpy())
               for a, v in zip(optimizer._model_variables_moving_average, variables))


def test_ema_overwrite_works_without_a_strategy_and_is_refused_where_keras_fails(mirrored, features):
    found, _ = contract.check_case("ema_overwrite", "ClipStep", True)
    assert not found, found
    # Under MirroredStrategy Keras's own apply fails with ema_overwrite_frequency (a cond around a
    # merge_call in the replica context): refused up front, naming the class and the feature.
    with mirrored.scope():
        for make in (distclip.ClipStep, distclip.keras.ClipOptimizer):
            with pytest.raises(distclip.ArgumentError, match="Nadam has ema_overwrite_frequency=2 under MirroredStrategy"):
                make(FEATURES["ema_overwrite"](), 1.0)


@pytest.mark.parametrize("make", [distclip.ClipStep, distclip.keras.ClipOptimizer], ids=contract.APIS)
@pytest.mark.parametrize("optimizer,match", [
    (lambda: keras.optimizers.Adam(gradient_accumulation_steps=2),
     "Adam has gradient_accumulation_steps=2.*accumulation_steps"),
    (lambda: keras.optimizers.SGD(loss_scale_factor=8.0), "SGD has loss_scale_factor=8.0.*LossScaleOptimizer"),
    (lambda: keras.optimizers.RMSprop(clipnorm=1.0), "RMSprop has clipnorm=1.0"),
    (lambda: keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(keras.optimizers.SGD(),
                                                                           {"a": keras.optimizers.Adam(clipvalue=1.0)})),
     "Adam has clipvalue=1.0"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Lion(global_clipnorm=2.0)),
     "Lion has global_clipnorm=2.0"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(), 1.0), "ClipOptimizer already clips"),
], ids=["gradient_accumulation_steps", "loss_scale_factor", "clipnorm", "inside MultiOptimizer",
        "inside LossScaleOptimizer", "ClipOptimizer"])
def test_unsupported_features_are_refused_at_construction(make, optimizer, match):
    with pytest.raises(distclip.ArgumentError, match=match):
        make(optimizer(), 1.0)


@pytest.mark.parametrize("api", contract.APIS)
def test_overwrite_with_gradient_variables_are_refused_before_anything_is_written(api):
    variables, optimizer = contract.make_variables(), keras.optimizers.Adam(0.1)
    variables[1].overwrite_with_gradient = True  # what float8 layers set on their scale and amax history
    wrapper = distclip.ClipStep(optimizer, 1.0) if api == "ClipStep" else distclip.keras.ClipOptimizer(optimizer, 1.0)
    before = contract.values(variables)
    grads = [tf.ones_like(v.value) for v in variables]
    for run in (lambda: wrapper.apply(grads, variables), tf.function(lambda: wrapper.apply(grads, variables))):
        with pytest.raises(distclip.ArgumentError, match="dense_kernel has overwrite_with_gradient=True"):
            run()
    assert all(np.array_equal(a, b) for a, b in zip(before, contract.values(variables)))
    assert not optimizer.built


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


def test_clipstep_from_another_strategy_is_an_error(mirrored):
    model, opt = make_model(), make_optimizer("sgd")
    step = distclip.ClipStep(opt, 1.0)  # created outside the scope
    grads = [tf.ones_like(v) for v in model.trainable_variables]

    def replica_fn():
        return step.apply(grads, model.trainable_variables).global_norm

    with pytest.raises(distclip.ContextError, match=r"strategy.scope\(\)"):
        mirrored.run(tf.function(replica_fn))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", ["ClipStep", "ClipOptimizer"])
def test_variables_the_optimizer_was_not_built_for_are_refused(mode, api):
    model, optimizer = make_model(), make_optimizer("adam")
    variables = model.trainable_variables
    optimizer.build(variables[:2])  # built for the first layer only
    wrapper = make_wrapper(api, optimizer)
    if api == "ClipOptimizer":
        wrapper.build(variables[:2])
    before = snapshot(model, optimizer, wrapper)
    grads = [tf.ones_like(v.value) for v in variables]
    with pytest.raises(distclip.ArgumentError, match=r"trainable_variables\[2\] \(sequential.*/kernel\) is not one of "
                                                      r"the 2 variables Adam was built for"):
        call(mode, lambda: wrapper.apply(grads, variables))
    assert unchanged(before, snapshot(model, optimizer, wrapper))


@pytest.mark.parametrize("mode", MODES)
def test_one_clipstep_for_a_second_model_is_refused(mode):
    first, second, optimizer = make_model(), make_model(seed=2), make_optimizer("sgd")
    step = distclip.ClipStep(optimizer, 1.0)
    call(mode, lambda: step.apply([tf.ones_like(v.value) for v in first.trainable_variables],
                                   first.trainable_variables))
    before = snapshot(second, optimizer, step) + [np.array(w) for w in first.get_weights()]
    with pytest.raises(distclip.ArgumentError, match="serves one set of variables; create new ones for another model"):
        call(mode, lambda: step.apply([tf.ones_like(v.value) for v in second.trainable_variables],
                                       second.trainable_variables))
    assert unchanged(before, snapshot(second, optimizer, step) + [np.array(w) for w in first.get_weights()])
