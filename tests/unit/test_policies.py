"""distclip._src.policies: their math against numpy (ZClip: against its reference code, transcribed), their state
across replicas, checkpoints and XLA."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
import distclip
from common import distributed_train, global_batch, make_model, max_abs_diff, replica_values
from graphs import host_round_trips
from reference_zclip import ReferenceZClip


NORMS = np.random.default_rng(3).lognormal(0.0, 1.0, size=40).astype("float32")
NORMS[[9, 25]] *= 50.0  # two spikes


def _run_policy(policy, norms):
    """Threshold at each step, then the update, as ClipStep does; eager."""
    state = {k: tf.fill(shape, tf.constant(init, dtype)) for k, (shape, dtype, init) in policy.state_spec().items()}
    out = []
    for n in norms:
        n = tf.constant(n)
        out.append(float(policy.threshold(state, n)))
        state = policy.update(state, n)
    return out, state


@pytest.mark.parametrize("percentile, history", [(10.0, 1000), (50.0, 8), (90.0, 5), (0.0, 3), (100.0, 7)])
def test_autoclip_is_the_percentile_of_the_norms_seen(percentile, history):
    got, state = _run_policy(distclip.AutoClip(percentile, history), NORMS)
    want = [np.percentile(NORMS[max(0, t - history + 1):t + 1], percentile) for t in range(len(NORMS))]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert int(state["count"]) == len(NORMS)


def test_spikeclip_matches_a_numpy_model():
    z, decay, warmup = 2.0, 0.9, 5
    got, _ = _run_policy(distclip.SpikeClip(z, decay, warmup), NORMS)
    want, mean, var = [], 0.0, 0.0
    for t, n in enumerate(NORMS.astype("float64")):
        threshold = np.inf if t < warmup else mean + z * np.sqrt(var)
        want.append(threshold)
        seen = min(n, threshold)
        w = 1.0 / (t + 1) if t < warmup else 1.0 - decay
        mean, var = mean + w * (seen - mean), (1 - w) * (var + w * (seen - mean) ** 2)
    warm = slice(warmup, None)
    np.testing.assert_allclose(got[warm], want[warm], rtol=1e-5)
    assert all(g >= 3e38 for g in got[:warmup]), "no clipping while warming up"
    # The spikes are clipped, the ordinary norms are not.
    clipped = [t for t in range(len(NORMS)) if NORMS[t] > got[t]]
    assert 9 in clipped and 25 in clipped and len(clipped) <= 6


def test_spikeclip_initial_clip_norm_applies_while_warming_up():
    got, _ = _run_policy(distclip.SpikeClip(warmup=3, initial_clip_norm=2.5), NORMS[:5])
    assert got[:3] == pytest.approx([2.5] * 3)


@pytest.mark.parametrize("options", [
    dict(warmup_steps=5, max_grad_norm=None), {}, dict(clip_option="mean", warmup_steps=5, max_grad_norm=None),
    dict(mode="percentile", z_thresh=2.0, warmup_steps=5, max_grad_norm=None),
    dict(alpha=0.9, clip_factor=0.7, skip_update_on_spike=True, warmup_steps=5, max_grad_norm=20.0),
], ids=["zscore", "defaults", "mean", "percentile", "skip-update"])
def test_zclip_gives_the_thresholds_of_the_reference_code(options):
    got, state = _run_policy(distclip.ZClip(**options), NORMS)
    reference = ReferenceZClip(**options)
    want = [reference.step(float(n)) for n in NORMS]
    clips = [t for t, (n, w) in enumerate(zip(NORMS, want)) if n > w]
    # Where the reference clips, the threshold is its clip value; elsewhere nothing is clipped.
    np.testing.assert_allclose([got[t] for t in clips], [want[t] for t in clips], rtol=1e-6)
    assert all(got[t] >= NORMS[t] for t in range(len(NORMS)) if t not in clips)
    np.testing.assert_allclose([float(state["mean"]), float(state["var"])], [reference.mean, reference.var],
                               rtol=1e-5)
    if options.get("warmup_steps") == 5:
        assert {9, 25} <= set(clips), "the spikes are clipped"


def test_zclip_under_mirrored_equals_its_reference_code_on_one_device(mirrored):
    """The contract's ZClip case (tests/contract.py; across processes in the scenario tier)."""
    found, run = contract.check_zclip("Adam", "ClipStep", True, strategy=mirrored, replicas=2)
    assert not found, found
    assert int(run.wrapper.policy_state["count"].numpy()) == contract.STEPS


@pytest.mark.parametrize("make, named", [
    (lambda: distclip.AutoClip(percentile=-1), "percentile=-1"), (lambda: distclip.AutoClip(percentile=101), "percentile=101"),
    (lambda: distclip.AutoClip(history=0), "history=0"), (lambda: distclip.AutoClip(history=2.5), "history=2.5"),
    (lambda: distclip.SpikeClip(z=0), "z=0"), (lambda: distclip.SpikeClip(z=float("nan")), "z=nan"),
    (lambda: distclip.SpikeClip(decay=1.0), "decay=1.0"), (lambda: distclip.SpikeClip(warmup=0), "warmup=0"),
    (lambda: distclip.SpikeClip(initial_clip_norm=-1.0), "initial_clip_norm=-1.0"),
    (lambda: distclip.ZClip(alpha=1.0), "alpha=1.0"), (lambda: distclip.ZClip(z_thresh=0), "z_thresh=0"),
    (lambda: distclip.ZClip(max_grad_norm=0.0), "max_grad_norm=0.0"), (lambda: distclip.ZClip(eps=0), "eps=0"),
    (lambda: distclip.ZClip(warmup_steps=0), "warmup_steps=0"), (lambda: distclip.ZClip(mode="z"), "mode='z'"),
    (lambda: distclip.ZClip(clip_option="max"), "clip_option='max'"),
    (lambda: distclip.ZClip(clip_factor=-1.0), "clip_factor=-1.0"),
    (lambda: distclip.ZClip(mode="percentile", clip_option="mean"), "clip_option='mean' with mode='percentile'"),
    (lambda: distclip.ZClip(clip_option="mean", clip_factor=0.5), "clip_factor=0.5 with mode='zscore'"),
    (lambda: distclip.ZClip(skip_update_on_spike=1), "skip_update_on_spike=1"),
])
def test_bad_policy_arguments_name_the_argument(make, named):
    with pytest.raises(distclip.ArgumentError) as e:
        make()
    # The message names the argument and shows the value it was given.
    assert f"got {named}" in str(e.value), str(e.value)


def test_sync_and_clip_refuses_a_policy():
    with pytest.raises(distclip.ArgumentError, match="policy"):
        distclip.sync_and_clip([tf.ones([2])], distclip.AutoClip())


# ZClip's state is SpikeClip's in shape and kind (mean, var, count): `slow`.
@pytest.mark.parametrize("policy", [distclip.AutoClip(50.0, 4), distclip.SpikeClip(0.1, 0.5, 2), pytest.param(
    distclip.ZClip(alpha=0.5, z_thresh=0.1, max_grad_norm=None, warmup_steps=2), marks=pytest.mark.slow)])
def test_clipstep_policy_resumes_exactly_under_mirrored(mirrored, tmp_path, policy):
    steps = 6
    batches = [global_batch(s) for s in range(steps)]
    # Uninterrupted.
    whole, norms, _, objs = distributed_train(mirrored, policy, steps, "adam", batches=batches)
    # Interrupted after 3 steps: checkpoint, restore into fresh objects, go on.
    _, _, _, first = distributed_train(mirrored, policy, 3, "adam", batches=batches[:3])
    path = tf.train.Checkpoint(model=first["model"], optimizer=first["optimizer"], clip=first["clip"]).save(
        os.path.join(tmp_path, "ckpt"))
    resumed, _, per_replica, again = distributed_train(
        mirrored, policy, 3, "adam", batches=batches[3:],
        restore=lambda o: tf.train.Checkpoint(model=o["model"], optimizer=o["optimizer"], clip=o["clip"]).restore(path))
    assert max_abs_diff(resumed, whole) == 0.0
    for name, var in objs["clip"].policy_state.items():
        np.testing.assert_array_equal(again["clip"].policy_state[name].numpy(), var.numpy())
    assert int(objs["clip"].policy_state["count"].numpy()) == steps
    # The state is identical on both replicas, and the policy did clip on some step.
    for values in replica_values(mirrored, list(again["clip"].policy_state.values())):
        assert all(np.array_equal(values[0], v) for v in values[1:])
    thresholds, _ = _run_policy(policy, np.array([n[0] for n in norms], "float32"))
    assert any(n[0] > t for n, t in zip(norms, thresholds))


# SpikeClip: `slow` (the unit tier compiles it through fit: keras/test_optimizer.py).
@pytest.mark.parametrize("policy", [distclip.AutoClip(50.0, 4), pytest.param(distclip.SpikeClip(1.0, 0.5, 2),
                                    marks=pytest.mark.slow), distclip.ZClip(max_grad_norm=None, warmup_steps=2)])
def test_policies_compile_under_xla(policy):
    x, y = global_batch(0)

    def run(jit):
        model = make_model()
        step = distclip.ClipStep(keras.optimizers.SGD(0.1), type(policy)(**policy.get_config()))

        @tf.function(jit_compile=jit)
        def train(scale):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y)) * scale
            r = step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return r.global_norm, r.scale

        outs = [[float(t) for t in train(tf.constant(s))] for s in (1.0, 1.0, 1.0, 30.0, 1.0)]
        if jit:
            assert "HloModule" in train.experimental_get_compiler_ir(tf.constant(1.0))(stage="hlo")
            assert not host_round_trips(train.get_concrete_function(tf.constant(1.0)).graph)
        return model.get_weights(), outs

    w_xla, o_xla = run(True)
    w_ref, o_ref = run(False)
    np.testing.assert_allclose(o_xla, o_ref, rtol=1e-5)
    assert max_abs_diff(w_xla, w_ref) <= 1e-5
    assert o_ref[3][1] < 1.0, "the spike at step 4 is clipped"
