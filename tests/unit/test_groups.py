"""distclip.ClipGroups: a threshold per group of variables, against `tf.clip_by_global_norm` applied per group
then over all on one device (under MirroredStrategy through tests/contract.py; across processes in the scenario
tier), with accumulation, a loss scale, AGC and XLA; its refusals; its saved configuration."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
import distclip
import reference_agc

SHAPES = {"embedding": (6, 2), "dense/kernel": (4, 3), "dense/bias": (3,), "out/kernel": (3, 1)}
EMBEDDING, DENSE = 0.4, 1.0  # the listed group's threshold, and the patterned group's at step 0 (then +0.25 a step)


def _variables():
    rng = np.random.default_rng(5)
    return [tf.Variable(rng.normal(size=s).astype("float32"), name=k) for k, s in SHAPES.items()]


def _gradients(step):
    """Dense gradients of varied size, and the embedding's as IndexedSlices with a repeated row."""
    rng = np.random.default_rng(40 + step)
    dense = [(rng.normal(size=s) * (0.05 if step % 2 else 2.0)).astype("float32") for s in list(SHAPES.values())[1:]]
    sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(3, 2)).astype("float32") * 2.0),
                              tf.constant([2, 5, 2], tf.int64), tf.constant(SHAPES["embedding"], tf.int64))
    return sparse, dense


def _groups(variables, global_clip_norm):
    """The embedding listed, the dense layer by a pattern with a threshold that grows each step, `out/kernel` in
    the default group, unclipped on its own."""
    return distclip.ClipGroups(
        [distclip.VariableGroup("embedding", EMBEDDING, variables=variables[:1]),
         distclip.VariableGroup("dense", lambda step: DENSE + 0.25 * tf.cast(step, tf.float32), patterns=["dense/.*"])],
        default=None, global_clip_norm=global_clip_norm)


@pytest.mark.parametrize("global_clip_norm, micro_batches, loss_scale, agc, jit", [
    (1.5, 1, None, None, True), (None, 2, 8.0, None, False), (1.5, 1, None, 0.5, False)],
    ids=["xla", "accumulated-lso", "after-agc"])
def test_groups_equal_clip_by_global_norm_per_group_then_over_all(global_clip_norm, micro_batches, loss_scale, agc,
                                                                  jit):
    variables = _variables()
    sgd = keras.optimizers.SGD(1.0)
    optimizer = sgd if loss_scale is None else keras.optimizers.LossScaleOptimizer(sgd, initial_scale=loss_scale)
    step = distclip.ClipStep(optimizer, _groups(variables, global_clip_norm), accumulation_steps=micro_batches,
                             agc=None if agc is None else distclip.AGC(agc))
    step.build(variables)
    factor = 1.0 if loss_scale is None else loss_scale

    @tf.function(jit_compile=jit)
    def apply(sparse, *dense):
        sparse = tf.IndexedSlices(sparse.values * factor, sparse.indices, sparse.dense_shape)
        r = step.apply([sparse] + [g * factor for g in dense], variables)
        return r.global_norm, r.clipped, r.finite, r.group_norms, r.group_scales

    clipped_by = []
    for s in range(3):
        before = [v.numpy() for v in variables]
        micro = [_gradients(10 * s + m) for m in range(micro_batches)]
        for sparse, dense in micro:
            norm, clipped, finite, group_norms, group_scales = apply(sparse, *dense)
        seen = [[tf.convert_to_tensor(sparse).numpy()] + dense for sparse, dense in micro]
        want = [np.mean([g[i] for g in seen], axis=0) for i in range(len(SHAPES))]
        if agc is not None:
            want, _ = reference_agc.agc(want, before, agc)
        want = [tf.constant(g, tf.float32) for g in want]
        thresholds = [EMBEDDING, DENSE + 0.25 * s, np.inf]  # updates so far: s (no skip before the last)
        norms = []
        for members, threshold in zip(([0], [1, 2], [3]), thresholds, strict=True):
            part, n = tf.clip_by_global_norm([want[i] for i in members], threshold if threshold < np.inf else 1.0)
            norms.append(float(n))
            if threshold == np.inf:  # the default group, unclipped on its own (clip_by_global_norm(g, inf) is NaN)
                continue
            for i, g in zip(members, part, strict=True):
                want[i] = g
        after = float(tf.linalg.global_norm(want))
        if global_clip_norm is not None:
            want, _ = tf.clip_by_global_norm(want, global_clip_norm)
        np.testing.assert_allclose(group_norms.numpy(), norms, rtol=1e-5)
        np.testing.assert_allclose(group_scales.numpy(), np.minimum(1.0, np.array(thresholds) / norms), rtol=1e-5)
        assert bool(finite) and float(norm) == pytest.approx(after, rel=1e-5)
        clipped_by.append([n > t for n, t in zip(norms, thresholds, strict=True)] + [after > (global_clip_norm or np.inf)])
        assert bool(clipped) == any(clipped_by[-1])
        # The optimizer's own apply took the clipped gradients: SGD(1.0) moves each variable by -g.
        for v, b, g in zip(variables, before, want, strict=True):
            np.testing.assert_allclose(b - v.numpy(), g.numpy(), rtol=1e-5, atol=1e-6, err_msg=v.name)
    # Each threshold binds on some step and not on another (the dense one only while it is low).
    assert [any(c) for c in zip(*clipped_by)][:2] == [True, True] and not all(all(c) for c in clipped_by)

    # A non-finite gradient in one group skips the whole update: nothing moves.
    before = [v.numpy() for v in variables]
    sparse, dense = _gradients(99)
    dense[2][0, 0] = np.nan
    for _ in range(micro_batches):
        _, _, finite, _, _ = apply(sparse, *dense)
    assert not bool(finite) and int(step.skipped_steps.numpy()) == 1
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, variables, strict=True))


@pytest.mark.parametrize("name, api, lazy", [
    ("Adam", "ClipStep", False), pytest.param("LossScaleOptimizer", "ClipOptimizer", True, marks=pytest.mark.slow)])
def test_groups_under_mirrored_equal_one_device_on_the_global_batch(mirrored, name, api, lazy):
    """The contract's groups case (tests/contract.py; across processes in the scenario tier), and through
    ClipOptimizer built lazily under a loss scale."""
    found, _ = contract.check_groups(name, api, lazy, strategy=mirrored, replicas=2)
    assert not found, found


def test_the_configuration_saves_listed_variables_by_path_and_rebuilds_the_same_groups():
    variables = [keras.Variable(np.zeros(s, "float32"), name=k.replace("/", "_")) for k, s in SHAPES.items()]
    groups = distclip.ClipGroups(
        [distclip.VariableGroup("embedding", 0.5, variables=variables[:1]),
         distclip.VariableGroup("dense", keras.optimizers.schedules.ExponentialDecay(2.0, 10, 0.5),
                                patterns=["dense_.*"])],
        default=3.0, global_clip_norm=distclip.ZClip(warmup_steps=5))
    wrapper = distclip.keras.ClipOptimizer(keras.optimizers.Adam(), groups)
    config = wrapper.get_config()
    assert config["clip_norm"]["config"]["groups"][0]["variables"] == ["embedding"]
    again = distclip.keras.ClipOptimizer.from_config(config).clip_norm
    assert isinstance(again, distclip.ClipGroups) and again.names == ["embedding", "dense", "default"]
    assert again.members(variables) == groups.members(variables) == [0, 1, 1, 2]
    np.testing.assert_allclose(again.thresholds(tf.constant(10)).numpy(), [0.5, 1.0, 3.0])
    assert isinstance(again.global_clip_norm, distclip.ZClip) and again.global_clip_norm.warmup_steps == 5
    with pytest.raises(NotImplementedError, match="clip_norm=<tf.Variable"):
        distclip.keras.ClipOptimizer(keras.optimizers.Adam(), distclip.ClipGroups(
            [distclip.VariableGroup("all", tf.Variable(1.0), patterns=[".*"])], default=None)).get_config()


def _group(**kwargs):
    return distclip.VariableGroup(**{"name": "g", "clip_norm": 1.0, "patterns": ["a.*"], **kwargs})


@pytest.mark.parametrize("make, named", [
    (lambda: _group(name="default"), "name='default'"),
    (lambda: _group(clip_norm=-1.0), "clip_norm=-1.0"),
    (lambda: _group(clip_norm=distclip.AutoClip()), "'g': clip_norm=AutoClip("),
    (lambda: _group(patterns=["a("]), "patterns holds 'a('"),
    (lambda: _group(patterns="a.*"), "patterns='a.*'"),
    (lambda: _group(patterns=[]), "'g' has no variables and no patterns"),
    (lambda: distclip.ClipGroups([], default=1.0), "groups=[]"),
    (lambda: distclip.ClipGroups([_group(), _group()], default=1.0), "'g' more than once"),
    (lambda: distclip.ClipGroups([_group()], default=distclip.SpikeClip()), "default=SpikeClip("),
    (lambda: distclip.ClipGroups([_group()], default=1.0, global_clip_norm=0), "clip_norm=0"),
    (lambda: distclip.sync_and_clip([tf.ones([2])], distclip.ClipGroups([_group()], default=1.0)),
     "sync_and_clip is not given the variables"),
    (lambda: distclip.ClipStep(keras.optimizers.SGD(), distclip.ClipGroups([_group()], default=1.0),
                               noise_scale=distclip.NoiseScale(global_batch_size=8)), "with a noise_scale"),
])
def test_bad_group_arguments_are_named(make, named):
    with pytest.raises(distclip.ArgumentError) as e:
        make()
    assert named in str(e.value), str(e.value)


@pytest.mark.parametrize("groups, named", [
    (lambda v: [_group(patterns=["a.*"]), _group(name="h", variables=[v[0]])], "a/x is in two groups, 'g' and 'h'"),
    (lambda v: [_group(patterns=["x"])], "'g' claims none of the variables updated (a/x, b/y)"),
    (lambda v: [_group(variables=["c/z"])], "'g' lists c/z, which is not among the variables updated"),
])
def test_a_variable_in_two_groups_or_an_empty_group_is_refused_when_building(groups, named):
    optimizer = keras.optimizers.Adam()
    variables = [tf.Variable(tf.zeros([2]), name="a/x"), tf.Variable(tf.zeros([3]), name="b/y")]
    step = distclip.ClipStep(optimizer, distclip.ClipGroups(groups(variables), default=1.0))
    with pytest.raises(distclip.ArgumentError) as e:
        step.build(variables)
    assert named in str(e.value), str(e.value)
    assert not optimizer.built
