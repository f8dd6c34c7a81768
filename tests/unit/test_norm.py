"""distclip._src.norm: the global norm of dense and sparse, low-precision and huge gradients, and the scale."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import make_model, make_optimizer


def _replica_slices(ctx_id):
    # Replica 0 repeats index 2; replica 1 hits index 2 again: the dense gradient sums all three.
    if ctx_id == 0:
        return tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]), tf.constant([0, 2, 2]), tf.constant([6, 2]))
    return tf.IndexedSlices(tf.constant([[2.0, 2.0], [-4.0, 1.0]]), tf.constant([2, 5]), tf.constant([6, 2]))


def test_indexed_slices_norm_is_dense_norm_under_mirrored(mirrored):
    dense_grad = [tf.constant([1.0, -2.0, 0.5]), tf.constant([0.0, 3.0, 1.0])]

    slices = [_replica_slices(0), _replica_slices(1)]
    values = mirrored.experimental_distribute_values_from_function(lambda c: slices[c.replica_id_in_sync_group].values)
    indices = mirrored.experimental_distribute_values_from_function(lambda c: slices[c.replica_id_in_sync_group].indices)
    dense = mirrored.experimental_distribute_values_from_function(lambda c: dense_grad[c.replica_id_in_sync_group])

    @tf.function
    def step(v, i, d):
        def fn(v, i, d):
            r = distclip.sync_and_clip([tf.IndexedSlices(v, i, tf.constant([6, 2])), None, d], 1.0)
            assert isinstance(r.grads[0], tf.IndexedSlices), "sparse gradients stay sparse"
            assert r.grads[1] is None
            return r.global_norm, tf.convert_to_tensor(r.grads[0]), r.grads[2]
        return mirrored.run(fn, args=(v, i, d))

    norm, emb, d = step(values, indices, dense)
    dense_emb = sum(tf.convert_to_tensor(s).numpy().astype(np.float64) for s in slices)
    dense_d = sum(g.numpy().astype(np.float64) for g in dense_grad)
    want = np.sqrt((dense_emb ** 2).sum() + (dense_d ** 2).sum())
    naive = np.sqrt(sum((s.values.numpy() ** 2).sum() for s in slices) + (dense_d ** 2).sum())
    assert abs(want - naive) > 0.5, "the data must tell a deduplicated norm from a naive one"
    for n in mirrored.experimental_local_results(norm):
        assert float(n) == pytest.approx(want, rel=1e-6)
    for e in mirrored.experimental_local_results(emb):
        np.testing.assert_allclose(e.numpy(), dense_emb / want, rtol=1e-6)


def test_embedding_model_matches_dense_reference(mirrored):
    ids = np.array([[1, 1, 3], [3, 0, 1], [2, 2, 2], [1, 0, 0]], "int32")
    y = np.array([[1.0], [-1.0], [0.5], [2.0]], "float32")

    def build():
        m = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 4), keras.layers.Flatten(), keras.layers.Dense(1)])
        rng = np.random.default_rng(3)
        m.set_weights([rng.normal(size=w.shape).astype("float32") for w in m.get_weights()])
        return m

    ref, ref_opt = build(), keras.optimizers.SGD(0.5)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ref(ids) - y))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, ref.trainable_variables)]
        grads, _ = tf.clip_by_global_norm(grads, 0.3)
        ref_opt.apply(grads, ref.trainable_variables)

    with mirrored.scope():
        model, opt = build(), keras.optimizers.SGD(0.5)
        step = distclip.ClipStep(opt, 0.3)
    xs = mirrored.experimental_distribute_values_from_function(lambda c: ids[c.replica_id_in_sync_group * 2:][:2])
    ys = mirrored.experimental_distribute_values_from_function(lambda c: y[c.replica_id_in_sync_group * 2:][:2])

    @tf.function
    def train(x, t):
        def fn(x, t):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - t)) / 4.0
            grads = tape.gradient(loss, model.trainable_variables)
            assert isinstance(grads[0], tf.IndexedSlices)
            return step.apply(grads, model.trainable_variables).clipped
        return mirrored.run(fn, args=(x, t))

    for _ in range(3):
        assert all(bool(c) for c in mirrored.experimental_local_results(train(xs, ys)))
    for a, b in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_low_precision_norm_against_float64(dtype):
    rng = np.random.default_rng(7)
    # 300**2 overflows float16; the norm must not.
    arrays = [rng.normal(scale=300.0, size=(64, 33)), rng.normal(size=(17,))]
    grads = [tf.constant(a, dtype) for a in arrays]
    exact = [g.numpy().astype(np.float64) for g in grads]  # the values as the dtype holds them
    want = np.sqrt(sum((e ** 2).sum() for e in exact))

    r = distclip.sync_and_clip(grads, 100.0)
    assert r.global_norm.dtype == tf.float32 and r.scale.dtype == tf.float32
    assert float(r.global_norm) == pytest.approx(want, rel=1e-6)
    assert all(g.dtype == dtype for g in r.grads)
    tol = {tf.float16: 2e-3, tf.bfloat16: 1e-2}.get(dtype, 1e-6)
    for got, e in zip(r.grads, exact):
        np.testing.assert_allclose(got.numpy().astype(np.float64), e * 100.0 / want, rtol=tol, atol=tol * 1e-2)


def test_float16_under_mirrored(mirrored):
    rng = np.random.default_rng(8)
    per = [rng.normal(scale=200.0, size=(40,)).astype(np.float16) for _ in range(2)]
    dist = mirrored.experimental_distribute_values_from_function(lambda c: tf.constant(per[c.replica_id_in_sync_group]))
    out = mirrored.run(tf.function(lambda g: distclip.sync_and_clip([g], 1.0).global_norm), args=(dist,))
    want = np.linalg.norm(per[0].astype(np.float64) + per[1].astype(np.float64))
    for n in mirrored.experimental_local_results(out):
        assert float(n) == pytest.approx(want, rel=2e-3)


def test_none_gradients_keep_their_place_and_their_variables(mirrored):
    with mirrored.scope():
        model, opt = make_model(), make_optimizer("adam")
        unused = keras.Variable(np.ones(3, "float32"), name="unused")
        step = distclip.ClipStep(opt, 0.5)
    variables = model.trainable_variables + [unused]
    x = np.ones((4, 4), "float32")

    @tf.function
    def train():
        def fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(model(x))
            grads = tape.gradient(loss, variables)
            assert grads[-1] is None
            r = step.apply(grads, variables)
            assert r.grads[-1] is None and len(r.grads) == len(variables)
            return r.global_norm
        return mirrored.run(fn)

    before = model.get_weights()
    train()
    assert np.array_equal(unused.numpy(), np.ones(3))
    assert not np.array_equal(before[0], model.get_weights()[0])


def test_xla_compiles_sync_and_clip_and_clipstep():
    ids = tf.constant([[1, 1], [0, 3]])

    def build():
        m = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(4, 3), keras.layers.Flatten(), keras.layers.Dense(1)])
        rng = np.random.default_rng(4)
        m.set_weights([rng.normal(size=w.shape).astype("float32") for w in m.get_weights()])
        return m

    def run(jit):
        m, opt = build(), keras.optimizers.Adam(0.1)
        step = distclip.ClipStep(opt, 0.2)

        @tf.function(jit_compile=jit)
        def train():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(m(ids) - 1.0))
            grads = tape.gradient(loss, m.trainable_variables)
            r = distclip.sync_and_clip(grads, 0.2)
            s = step.apply(grads, m.trainable_variables)
            return r.global_norm, s.global_norm, s.scale

        outs = [train() for _ in range(3)]
        if jit:
            hlo = train.experimental_get_compiler_ir()(stage="hlo")
            assert "HloModule" in hlo
        return m.get_weights(), outs

    w_xla, o_xla = run(True)
    w_ref, o_ref = run(False)
    for a, b in zip(w_xla, w_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(o_xla, o_ref):
        np.testing.assert_allclose([float(t) for t in a], [float(t) for t in b], rtol=1e-5)
    assert float(o_ref[0][2]) < 1.0, "the threshold must bind"


@pytest.mark.parametrize("backend", ["none", "mirrored"])
def test_finite_gradients_near_the_float32_limit_clip_instead_of_skipping(mirrored, backend):
    rng = np.random.default_rng(3)
    full = [rng.normal(size=(4, 3)) * 1e20, rng.normal(size=(3,)) * 3e19]  # squares overflow float32
    want_norm = np.sqrt(sum((g.astype(np.float32).astype(np.float64) ** 2).sum() for g in full))
    assert np.isfinite(want_norm) and want_norm < np.finfo(np.float32).max
    strategy = mirrored if backend == "mirrored" else tf.distribute.get_strategy()
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