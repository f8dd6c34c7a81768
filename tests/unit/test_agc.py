"""distclip._src.agc: unit-wise adaptive gradient clipping against the paper's formula in numpy
(tests/reference_agc.py), then the global clip; under MirroredStrategy against one device (tests/contract.py;
across processes in the scenario tier)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
import distclip
import reference_agc

#: A variable of each kind of unit: whole (a scalar, a vector, a (1, n) row, zero-initialized: eps), columns
#: (rank 2, rank 3), output channels (rank 4), and an embedding whose gradient is sparse with a repeated row.
SHAPES = {"scale": (), "bias": (3,), "row": (1, 4), "kernel": (4, 3), "zeros": (3, 2), "heads": (2, 3, 2),
          "conv": (2, 2, 3, 2), "embedding": (6, 2)}
CLIPPING, CLIP_NORM = 0.5, 0.9


def _variables():
    rng = np.random.default_rng(3)
    return [tf.Variable(np.zeros(s, "float32") if k == "zeros" else rng.normal(size=s).astype("float32"), name=k)
            for k, s in SHAPES.items()]


def _gradients(step):
    """Dense gradients (per unit, from far below to far above its bound) and the embedding's as IndexedSlices."""
    rng = np.random.default_rng(10 + step)
    dense = [(rng.normal(size=s) * rng.choice([0.05, 3.0], size=s[-1:] or None)).astype("float32")
             for s in list(SHAPES.values())[:-1]]
    rows = np.array([1, 4, 1], "int64")
    return dense, tf.IndexedSlices(tf.constant(rng.normal(size=(3, 2)).astype("float32") * 2.0), tf.constant(rows),
                                   tf.constant(SHAPES["embedding"], tf.int64))


def _numpy(dense, sparse):
    return dense + [tf.convert_to_tensor(sparse).numpy()]


@pytest.mark.parametrize("clip_norm, micro_batches, loss_scale", [
    (None, 1, None), (CLIP_NORM, 1, None), (CLIP_NORM, 2, 8.0)], ids=["alone", "then-global", "accumulated-lso"])
def test_agc_equals_the_papers_formula_then_the_global_clip(clip_norm, micro_batches, loss_scale):
    variables = _variables()
    sgd = keras.optimizers.SGD(1.0)
    optimizer = sgd if loss_scale is None else keras.optimizers.LossScaleOptimizer(sgd, initial_scale=loss_scale)
    step = distclip.ClipStep(optimizer, clip_norm, agc=distclip.AGC(CLIPPING), accumulation_steps=micro_batches)
    step.build(variables)
    factor = 1.0 if loss_scale is None else loss_scale

    @tf.function
    def apply(*grads):
        r = step.apply([g * factor for g in grads[:-1]] + [grads[-1]], variables)
        return r.global_norm, r.finite

    for s in range(2):
        before = [v.numpy() for v in variables]
        micro = [_gradients(10 * s + m) for m in range(micro_batches)]
        for dense, sparse in micro:
            if loss_scale is not None:
                sparse = tf.IndexedSlices(sparse.values * factor, sparse.indices, sparse.dense_shape)
            norm, finite = apply(*dense, sparse)
        seen = [_numpy(d, sp) for d, sp in micro]
        mean = [np.mean([g[i] for g in seen], axis=0) for i in range(len(SHAPES))]
        want, counts = reference_agc.agc(mean, before, CLIPPING)
        assert 0 < sum(counts) < sum(int(np.prod(s)) for s in SHAPES.values()), counts  # some units, not all
        want, want_norm = reference_agc.global_clip(want, clip_norm)
        assert bool(finite) and float(norm) == pytest.approx(want_norm, rel=1e-6)
        if clip_norm is not None:
            assert want_norm > clip_norm, "the global clip binds after AGC"
        # The optimizer's own apply took the clipped gradients: SGD(1.0) moves each variable by -g.
        for v, b, g in zip(variables, before, want):
            np.testing.assert_allclose(b - v.numpy(), g, rtol=1e-5, atol=1e-6, err_msg=v.name)
    assert counts[list(SHAPES).index("zeros")] > 0, "a variable near zero is clipped at eps"

    # A non-finite unit skips the whole update: nothing moves.
    before = [v.numpy() for v in variables]
    dense, sparse = _gradients(99)
    dense[3][0, 0] = np.inf
    for _ in range(micro_batches):
        _, finite = apply(*dense, sparse)
    assert not bool(finite) and int(step.skipped_steps.numpy()) == 1
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


def test_agc_under_mirrored_equals_one_device_on_the_global_batch(mirrored):
    """The contract's AGC case (tests/contract.py; across processes in the scenario tier)."""
    found, _ = contract.check_agc("Adam", "ClipStep", True, strategy=mirrored, replicas=2)
    assert not found, found


@pytest.mark.slow
def test_agc_with_a_loss_scale_under_mirrored_through_clip_optimizer(mirrored):
    found, _ = contract.check_agc("LossScaleOptimizer", "ClipOptimizer", False, strategy=mirrored, replicas=2)
    assert not found, found


@pytest.mark.parametrize("make, named", [
    (lambda: distclip.AGC(0), "clipping=0"), (lambda: distclip.AGC(float("nan")), "clipping=nan"),
    (lambda: distclip.AGC(0.01, eps=0.0), "eps=0.0"),
    (lambda: distclip.ClipStep(keras.optimizers.SGD(), 1.0, agc=0.01), "agc=0.01"),
    (lambda: distclip.ClipStep(keras.optimizers.SGD(), 1.0, agc=distclip.AGC(0.01),
                               noise_scale=distclip.NoiseScale(global_batch_size=8)), "agc=AGC(clipping=0.01"),
])
def test_bad_agc_arguments_name_the_argument(make, named):
    with pytest.raises(distclip.ArgumentError) as e:
        make()
    assert named in str(e.value), str(e.value)


def test_a_variable_without_units_is_refused_when_building_before_anything_is_made():
    optimizer = keras.optimizers.Adam()
    step = distclip.ClipStep(optimizer, 1.0, agc=distclip.AGC(0.01))
    variables = [tf.Variable(tf.zeros([2, 2, 2, 2, 2]), name="conv3d_kernel"), tf.Variable(tf.zeros([3]))]
    with pytest.raises(distclip.ArgumentError, match=r"conv3d_kernel.* of shape \(2, 2, 2, 2, 2\)"):
        step.build(variables)
    assert not optimizer.built
