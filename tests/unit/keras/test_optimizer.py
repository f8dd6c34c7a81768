"""distclip._src.keras.optimizer: model.fit with ClipOptimizer in this process (default strategy and MirroredStrategy)
against Keras's own single-device global_clipnorm fit."""
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
import distclip
import distclip.keras
from common import GLOBAL_BATCH, make_model, max_abs_diff, read_tensorboard
from distclip.train.plots import read_csv
from fitting import CLIP, STEPS, clip_adam, data, fit, keras_adam
from graphs import fit_collectives, fit_xla_functions


@pytest.mark.parametrize("where", ["default", "mirrored"])
def test_fit_matches_single_device_global_clipnorm(reference, mirrored, where, tmp_path):
    strategy = mirrored if where == "mirrored" else None
    model, optimizer, history = fit(clip_adam(), strategy, log_dir=str(tmp_path))
    ref_weights, ref_norms = reference
    assert max_abs_diff(model.get_weights(), ref_weights) <= 1e-5
    # The metrics fit logs: epoch means of the synchronized norm and of the scale, and the skip count.
    assert history["global_norm"] == pytest.approx([np.mean(ref_norms)], rel=1e-5)
    assert history["clip_scale"] == pytest.approx([np.mean([CLIP / n for n in ref_norms])], rel=1e-5)
    assert history["skipped_steps"] == [0.0]
    assert int(optimizer.iterations.numpy()) == STEPS
    # ClipLogger's per-step CSV: the reference's norms, the threshold, the scale.
    rows = read_csv(os.path.join(tmp_path, "metrics.csv"))
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["global_norm"] for r in rows] == pytest.approx(ref_norms, rel=1e-5)
    assert [r["clip_norm"] for r in rows] == pytest.approx([CLIP] * STEPS)
    assert [r["scale"] for r in rows] == pytest.approx([CLIP / n for n in ref_norms], rel=1e-5)
    assert [r["clipped"] for r in rows] == [1.0] * STEPS and [r["skipped"] for r in rows] == [0.0] * STEPS
    # The same per-step scalars in TensorBoard.
    board = read_tensorboard(os.path.join(tmp_path, "tensorboard"))
    assert [s for s, _ in board["global_norm"]] == list(range(STEPS))
    assert [v for _, v in board["global_norm"]] == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.parametrize("clip_norm", [CLIP, distclip.SpikeClip(1.0, 0.9, 2)])
def test_fit_compiles_under_xla(reference, clip_norm):
    """`compile(jit_compile=True)`: the whole train step, ClipOptimizer included, as one XLA cluster."""
    x, y = data()
    with tf.distribute.get_strategy().scope():
        model = make_model()
        model.compile(optimizer=clip_adam(clip_norm, accumulation_steps=1)(), loss="mse", jit_compile=True)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    # What TensorFlow was told: Keras's step function (ClipOptimizer's apply inside it) must compile with XLA.
    assert any("one_step_on_data" in name for name in fit_xla_functions(model)), fit_xla_functions(model)
    if clip_norm == CLIP:
        assert max_abs_diff(model.get_weights(), reference[0]) <= 1e-5
    assert int(model.optimizer.iterations.numpy()) == STEPS


def test_keras_global_clipnorm_under_mirrored_does_not_match(reference, mirrored):
    model, _, _ = fit(keras_adam(global_clipnorm=CLIP), mirrored)
    assert max_abs_diff(model.get_weights(), reference[0]) > 1e-3


def test_fit_does_one_reduction(mirrored):
    plain, _, _ = fit(keras_adam(), mirrored, steps=1)
    ours, _, _ = fit(clip_adam(), mirrored, steps=1)
    n_params = sum(int(np.prod(v.shape)) for v in plain.trainable_variables)
    # Plain Keras reduces each step's gradients once, packed: one collective per device, every gradient element once.
    assert sorted(fit_collectives(plain)) == [(n_params, 1)] * mirrored.num_replicas_in_sync
    # distclip's fit moves exactly that, plus each replica's report (a flag per replica and its own sum of
    # squares), in the same number of collectives: no second reduction.
    replicas = mirrored.num_replicas_in_sync
    assert sorted(fit_collectives(ours)) == [(n_params + replicas + 1, 1)] * replicas


def test_nonfinite_step_is_skipped_by_fit(mirrored):
    x, y = data(2)
    x[GLOBAL_BATCH - 1, 0] = np.inf  # step 0, the second replica's half only
    with mirrored.scope():
        model = make_model()
    before = model.get_weights()
    model, optimizer, history = fit(clip_adam(), mirrored, x=x[:GLOBAL_BATCH], y=y[:GLOBAL_BATCH], model=model)
    assert max_abs_diff(model.get_weights(), before) == 0.0
    assert history["skipped_steps"] == [1.0]
    assert int(optimizer.iterations.numpy()) == 0
    slots = [v for v in optimizer.inner_optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert len(slots) == 2 * len(model.trainable_variables)
    assert all(np.all(v.numpy() == 0) for v in slots)  # Adam's moments untouched


@pytest.mark.parametrize("clip_norm", [CLIP, distclip.AutoClip(50.0, 8), distclip.SpikeClip(2.0, 0.9, 2),
                                       distclip.ZClip(mode="percentile", skip_update_on_spike=True),
                                       keras.optimizers.schedules.ExponentialDecay(1.0, 2, 0.5)])
def test_config_round_trip(clip_norm):
    optimizer = distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), clip_norm, nonfinite="raise",
                                             agc=distclip.AGC(0.02, eps=1e-4))
    config = keras.saving.serialize_keras_object(optimizer)
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is distclip.keras.ClipOptimizer and again.agc == distclip.AGC(0.02, eps=1e-4)
    assert again.get_config() == optimizer.get_config()
    assert again.inner_optimizer.get_config() == optimizer.inner_optimizer.get_config()


def _resume(save_and_load, strategy, clip_norm):
    """Trains 2 steps, saves, loads, trains 2 more; returns (resumed weights, uninterrupted weights, opt, opt)."""
    x, y = data(4)
    whole, whole_opt, _ = fit(clip_adam(clip_norm), strategy, x=x, y=y)
    first, first_opt, _ = fit(clip_adam(clip_norm), strategy, x=x[:32], y=y[:32])
    resumed, resumed_opt = save_and_load(first, first_opt)
    resumed.fit(x[32:], y[32:], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return resumed, whole, resumed_opt, whole_opt


# The `.keras` file's round trip (an AutoClip's state included): tests/unit/test_rewind.py, three cut points.


def test_checkpoint_round_trip_resumes_exactly(tmp_path, mirrored):
    def save_and_load(model, optimizer):
        path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(os.path.join(tmp_path, "ckpt"))
        with mirrored.scope():
            fresh = make_model(seed=7)
            fresh_opt = clip_adam(distclip.SpikeClip(2.0, 0.9, 2))()
            fresh.compile(optimizer=fresh_opt, loss="mse")
            fresh_opt.build(fresh.trainable_variables)
        tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path).assert_existing_objects_matched()
        return fresh, fresh_opt

    resumed, whole, resumed_opt, whole_opt = _resume(save_and_load, mirrored, distclip.SpikeClip(2.0, 0.9, 2))
    assert int(resumed_opt.iterations.numpy()) == 4
    assert max_abs_diff(resumed.get_weights(), whole.get_weights()) == 0.0
    assert max_abs_diff([v.numpy() for v in resumed_opt.variables], [v.numpy() for v in whole_opt.variables]) == 0.0


@pytest.mark.parametrize("make, named", [
    (lambda: distclip.keras.ClipOptimizer("adam", 1.0), "optimizer"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), -1.0), "clip_norm"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), float("nan")), "clip_norm"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1, global_clipnorm=1.0), 1.0), "global_clipnorm"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0, nonfinite="ignore"), "nonfinite"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0, backend="nccl"), "backend"),
])
def test_bad_arguments_name_the_argument(make, named):
    with pytest.raises(distclip.ArgumentError, match=named):
        make()


def test_fit_under_mirrored_keeps_xla_off_and_explicit_xla_fails_in_keras_itself(mirrored):
    """Keras's "auto" turns XLA off under MirroredStrategy. Asked for explicitly, on logical CPU devices, XLA's
    placement fails Keras's own step the same way with or without ClipOptimizer (tensorflow.org/xla/known_issues,
    "tf.Variable on a different device"); the day it works, this test fails and the README's note can go."""
    model, _, _ = fit(clip_adam(), mirrored, steps=1)
    assert model.jit_compile is False and not fit_xla_functions(model)
    for optimizer in (keras_adam(global_clipnorm=CLIP), clip_adam()):
        with pytest.raises(tf.errors.InvalidArgumentError, match="Trying to access resource .* located in device"):
            fit(optimizer, mirrored, steps=1, jit_compile=True)


# --- The wrapper answers for the optimizer it wraps (see ClipOptimizer's docstring and README's table) ---

#: Public names of keras.optimizers.Optimizer the wrapper keeps as its own, each with the same meaning as on any
#: optimizer: its own variables (distclip's state, saved with it) and how the whole is built, saved and applied.
OWN = {"add_optimizer_variables", "add_variable", "add_variable_from_reference", "assign", "assign_add", "assign_sub",
       "apply", "apply_gradients", "build", "built", "from_config", "get_config", "load_own_variables", "name",
       "save_own_variables", "set_weights", "variables", "loss_scale_factor",
       "inner_optimizer"}  # the optimizer it wraps, as on a LossScaleOptimizer
#: The wrapper's own methods that call the inner optimizer's (through a LossScaleOptimizer or MultiOptimizer to the
#: optimizers that update, for exclude_from_weight_decay: tested against Keras below).
CALLS_INNER = {"exclude_from_weight_decay", "scale_loss", "finalize_variable_values"}
#: Raise an error naming the method and what to call instead.
REFUSED = {"update_step": "ClipOptimizer.update_step: the wrapper has no update of its own",
           "stateless_apply": "ClipOptimizer.stateless_apply: ClipOptimizer runs on the TensorFlow backend"}


def _public_names(opt):
    return {n for n in dir(type(opt)) if not n.startswith("_")} | {n for n in vars(opt) if not n.startswith("_")}


@pytest.mark.parametrize("name", contract.exported())
def test_every_public_name_of_the_inner_optimizer_is_forwarded_kept_or_refused(name):
    inner = contract.FACTORIES.get(name, lambda: getattr(keras.optimizers, name)(learning_rate=0.05))()
    wrapper = distclip.keras.ClipOptimizer(inner, clip_norm=1.0)
    names = _public_names(inner) | {n for n in dir(keras.optimizers.Optimizer) if not n.startswith("_")}
    for n in sorted(names - OWN - set(REFUSED) - CALLS_INNER):
        try:
            want = getattr(inner, n)
        except AttributeError as e:  # MultiOptimizer's learning_rate: the wrapper raises the same
            with pytest.raises(AttributeError, match=re.escape(str(e))):
                getattr(wrapper, n)
            continue
        got = getattr(wrapper, n)
        if callable(want) and hasattr(want, "__self__"):
            assert got.__self__ is inner and got.__func__ is want.__func__, n  # the inner's own bound method
        else:
            assert got is want or got == want, (n, got, want)
    assert float(wrapper.scale_loss(tf.constant(2.0))) == float(inner.scale_loss(tf.constant(2.0)))
    for n, message in REFUSED.items():
        with pytest.raises(NotImplementedError, match=message):
            getattr(wrapper, n)(None, None, None)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        wrapper.not_a_name


def test_configuration_set_on_the_wrapper_is_set_on_the_inner_optimizer():
    inner = keras.optimizers.AdamW(0.1, weight_decay=0.004)
    wrapper = distclip.keras.ClipOptimizer(inner, clip_norm=1.0)
    wrapper.weight_decay = 0.5
    wrapper.use_ema = True
    assert (inner.weight_decay, inner.use_ema) == (0.5, True) and wrapper.weight_decay == 0.5


def _decaying(name):
    """`name` with weight decay and no exclusions yet; returns (optimizer, the optimizers that update)."""
    if name == "LossScaleOptimizer":
        leaf = keras.optimizers.Adam(1.0, weight_decay=0.004)
        return keras.optimizers.LossScaleOptimizer(leaf), [leaf]
    if name == "MultiOptimizer":
        leaves = [keras.optimizers.SGD(1.0, weight_decay=0.004), keras.optimizers.Adam(1.0, weight_decay=0.004)]
        return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(leaves[0], {"keep.*": leaves[1]})), leaves
    opt = getattr(keras.optimizers, name)(1.0, weight_decay=0.004)
    return opt, [opt]


@pytest.mark.parametrize("how", ["var_names", "var_list"])
@pytest.mark.parametrize("name", sorted(set(contract.exported()) - {"Ftrl"}))  # Ftrl has no weight decay
def test_weight_decay_exclusions_on_the_wrapper_equal_kerass_own(name, how):
    """Oracle: Keras's own optimizer, the exclusions made on the optimizers that update (a LossScaleOptimizer's
    or MultiOptimizer's own exclude_from_weight_decay would change nothing), one step with zero gradients."""
    results = []
    for wrapped in (False, True):
        variables = [keras.Variable(np.full((2, 2), 2.0, "float32"), name=n) for n in ("keep", "exclude")]
        opt, leaves = _decaying(name)
        exclusion = {"var_names": ["exclude"]} if how == "var_names" else {"var_list": [variables[1]]}
        if wrapped:
            opt = distclip.keras.ClipOptimizer(opt, clip_norm=None)
            opt.exclude_from_weight_decay(**exclusion)
        else:
            for leaf in leaves:
                leaf.exclude_from_weight_decay(**exclusion)
        for _ in range(2):  # ScheduleFreeAdamW moves the weights from its second step on
            opt.apply([tf.zeros((2, 2))] * 2, variables)
        results.append([v.numpy() for v in variables])
    (keep, excluded), (wrapper_keep, wrapper_excluded) = results
    np.testing.assert_array_equal(wrapper_keep, keep)
    np.testing.assert_array_equal(wrapper_excluded, excluded)
    if name != "Muon":  # Muon decays 2-D variables through its own rule, not exclude_from_weight_decay
        assert not np.array_equal(keep, excluded), "weight decay acted on neither or both: the test proves nothing"


def _lazy_fit_and_evaluate(optimizer):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])  # built by fit
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history["loss"]
    return model.get_weights(), history + [model.evaluate(x, y, verbose=0)]


# Each exported optimizer once; the ones with extra machinery in the unit tier, the rest (Adam among them) slow.
FAST_LAZY = {"ScheduleFreeAdamW", "LossScaleOptimizer", "MultiOptimizer", "Muon"}


@pytest.mark.parametrize("name", [n if n in FAST_LAZY else pytest.param(n, marks=pytest.mark.slow)
                                  for n in contract.exported()])
def test_fit_and_evaluate_with_a_lazily_built_model_equal_keras_alone(name):
    factory = contract.FACTORIES.get(name, lambda: getattr(keras.optimizers, name)(learning_rate=0.05))
    ref_weights, ref_losses = _lazy_fit_and_evaluate(factory())
    weights, losses = _lazy_fit_and_evaluate(distclip.keras.ClipOptimizer(factory(), clip_norm=1e6))  # never binds
    assert max_abs_diff(weights, ref_weights) <= 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_a_saved_model_loads_in_a_fresh_process_after_import_distclip_keras(tmp_path):
    """What the README says: `import distclip.keras` registers ClipOptimizer (and the policies) with Keras, and
    importing distclip changes nothing else in Keras or Python (its trainer, the import system) and prints nothing."""
    model = make_model()
    model.compile(optimizer=distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.01), distclip.AutoClip(90.0, 2)),
                  loss="mse")
    model.fit(np.ones((8, 4), "float32"), np.ones((8, 1), "float32"), verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    code = FRESH_PROCESS % path
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["unchanged", "''", "ClipOptimizer", "AutoClip", "1"], r.stdout + r.stderr[-3000:]


FRESH_PROCESS = """
import io, sys
import keras
from keras.src.backend.tensorflow import trainer
def state():
    return (trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica, list(sys.meta_path),
            sorted(keras.saving.get_custom_objects()))
before = state()
sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
import distclip, distclip.cluster
after_distclip = state()
import distclip.keras
printed = sys.stdout.getvalue() + sys.stderr.getvalue()
sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
after = state()
# `import distclip` changes nothing; `import distclip.keras` only registers its classes for saved models.
print("unchanged" if before == after_distclip and before[:3] == after[:3] else "changed", repr(printed))
m = keras.saving.load_model(%r)
print(type(m.optimizer).__name__, type(m.optimizer.clip_norm).__name__, int(m.optimizer.iterations))
"""
