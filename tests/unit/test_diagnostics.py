"""Where a step went non-finite (replica, variable), per-variable norms, and the gradient noise scale."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import GLOBAL_BATCH, global_batch, make_model, make_optimizer, max_abs_diff, shard
from graphs import host_round_trips


def _poisoning_step(strategy, clip, model):
    """A traced step(x, y, replica, variable, value) whose replica `replica` adds `value` to one element of its
    gradient of variable `variable` (one trace for every case)."""
    @tf.function
    def step(x, y, replica, variable, value):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            me = tf.distribute.get_replica_context().replica_id_in_sync_group
            for i, g in enumerate(grads):
                flat = tf.reshape(g, [-1])
                hit = tf.logical_and(tf.equal(me, replica), tf.equal(variable, i))
                poison = tf.tensor_scatter_nd_update(tf.zeros_like(flat), [[0]], [value])
                grads[i] = tf.reshape(tf.where(hit, flat + poison, flat), g.shape)
            return clip.apply(grads, model.trainable_variables)
        return strategy.run(replica_fn, args=(x, y))

    return lambda x, y, replica, variable, value: step(
        shard(strategy, x), shard(strategy, y), tf.constant(replica), tf.constant(variable), tf.constant(value, tf.float32))


def test_a_nonfinite_step_names_the_replica_and_the_variable(mirrored):
    with mirrored.scope():
        model = make_model()
        optimizer = make_optimizer("adam")
        clip = distclip.ClipStep(optimizer, 1.0, variable_norms=True)
        optimizer.build(model.trainable_variables)
    step = _poisoning_step(mirrored, clip, model)
    x, y = global_batch()
    before = [w.copy() for w in model.get_weights()]
    for skipped, (replica, variable, value) in enumerate([(0, 0, np.inf), (1, 3, np.nan), (1, 1, -np.inf)], 1):
        result = step(x, y, replica, variable, value)
        expected_replicas = [r == replica for r in range(2)]
        expected_variables = [i == variable for i in range(4)]
        for r in mirrored.experimental_local_results(result.nonfinite_replicas):
            assert r.numpy().tolist() == expected_replicas
        for v in mirrored.experimental_local_results(result.nonfinite_variables):
            assert v.numpy().tolist() == expected_variables
        assert not bool(mirrored.experimental_local_results(result.finite)[0])
        # The step's state says the same, on every replica, and nothing was applied.
        for var, expected in ((clip.nonfinite_replicas, expected_replicas),
                              (clip.nonfinite_variables, expected_variables)):
            for local in mirrored.experimental_local_results(var):
                assert local.numpy().astype(bool).tolist() == expected
        assert int(clip.skipped_steps.numpy()) == skipped
        assert max_abs_diff(model.get_weights(), before) == 0.0
    # A finite step clears it.
    finite = step(x, y, 1, 0, 0.0)
    assert not any(mirrored.experimental_local_results(finite.nonfinite_replicas)[0].numpy())
    assert not any(mirrored.experimental_local_results(finite.nonfinite_variables)[0].numpy())
    assert not np.any(mirrored.experimental_local_results(clip.nonfinite_variables)[0].numpy())
    assert max_abs_diff(model.get_weights(), before) > 0.0


def test_attribution_compiles_with_xla_and_adds_no_host_op():
    model = make_model()
    optimizer = make_optimizer("sgd")
    clip = distclip.ClipStep(optimizer, 1.0, variable_norms=True)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x, y, poison):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        grads[2] = grads[2] * poison
        return clip.apply(grads, model.trainable_variables)

    x, y = global_batch()
    ok = step(x, y, tf.constant(1.0))
    bad = step(x, y, tf.constant(np.nan, tf.float32))
    assert ok.nonfinite_variables.numpy().tolist() == [False] * 4 and ok.nonfinite_replicas.numpy().tolist() == [False]
    assert bad.nonfinite_variables.numpy().tolist() == [False, False, True, False]
    assert bad.nonfinite_replicas.numpy().tolist() == [True]
    graph = step.get_concrete_function(x, y, tf.constant(1.0)).graph
    assert not host_round_trips(graph)


def test_variable_norms_are_those_of_the_single_device_gradients(mirrored):
    x, y = global_batch()
    ref = make_model()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(ref(x) - y))
    expected = [float(tf.norm(g)) for g in tape.gradient(loss, ref.trainable_variables)]
    with mirrored.scope():
        model = make_model()
        optimizer = make_optimizer("sgd")
        clip = distclip.ClipStep(optimizer, 0.1, variable_norms=True)
        optimizer.build(model.trainable_variables)
    result = _poisoning_step(mirrored, clip, model)(x, y, 0, 0, 0.0)
    for norms in mirrored.experimental_local_results(result.variable_norms):
        np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-5)
    total = float(mirrored.experimental_local_results(result.global_norm)[0])
    assert total == pytest.approx(float(np.sqrt(np.sum(np.square(expected)))), rel=1e-5)
    assert total > 0.1  # clipped: the norms are those before clipping
    np.testing.assert_allclose(mirrored.experimental_local_results(clip.variable_norms)[0].numpy(),
                               expected, rtol=1e-5)


def test_variable_norms_are_off_by_default():
    clip = distclip.ClipStep(make_optimizer("sgd"), 1.0)
    model = make_model()
    clip.build(model.trainable_variables)
    x, y = global_batch()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    result = clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    assert result.variable_norms is None and result.noise is None
    assert clip.variable_norms is None


# Linear regression with Gaussian inputs: y = x . w* + e, x ~ N(0, I_d), e ~ N(0, s2), loss (x . w - y)^2 / 2.
# At w = w* + delta the per-example gradient x (x . delta - e) has mean delta and covariance
# (|delta|^2 + s2) I + delta delta^T, so |G|^2 = |delta|^2 and tr(Sigma) = d (|delta|^2 + s2) + |delta|^2.
D, S2, BATCH = 8, 1.0, 64
DELTA = np.full(D, 1.0 / np.sqrt(D), np.float32)  # |delta|^2 = 1
TRUE_G2, TRUE_TRACE = 1.0, D * (1.0 + S2) + 1.0
TOLERANCE = 0.2  # the EMA of about 100 steps: a standard deviation of about 7% for B_simple (numpy simulation)


def _regression_batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.normal(size=(BATCH, D)).astype(np.float32)
        yield x, (x @ -DELTA + rng.normal(size=BATCH) * np.sqrt(S2)).astype(np.float32)[:, None]


@pytest.mark.parametrize("variant", ["plain", "accumulation", "loss_scale"])
def test_noise_scale_matches_the_closed_form_under_mirrored(mirrored, variant):
    """B = 64 per update: one batch of 64, two micro-batches of 32, or one batch under a dynamic loss scale."""
    k = 2 if variant == "accumulation" else 1
    with mirrored.scope():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
        optimizer = keras.optimizers.SGD(0.0)  # w stays at w* + delta (w* = -delta, w = 0)
        if variant == "loss_scale":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        clip = distclip.ClipStep(optimizer, None, accumulation_steps=k,
                                 noise_scale=distclip.NoiseScale(global_batch_size=BATCH, decay=0.99))
        clip.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = optimizer.scale_loss(tf.reduce_sum(0.5 * tf.square(model(x) - y)) / (BATCH // k))
            return clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables).noise
        return mirrored.run(replica_fn, args=(x, y))

    for x, y in _regression_batches(300):
        for i in range(k):
            part = slice(i * BATCH // k, (i + 1) * BATCH // k)
            noise = step(shard(mirrored, x[part]), shard(mirrored, y[part]))
    if variant == "loss_scale":
        assert float(optimizer.dynamic_scale.numpy()) > 1.0
    estimates = [[float(v) for v in mirrored.experimental_local_results(field)] for field in noise]
    for per_replica in estimates:
        assert per_replica[0] == per_replica[1]
    g2, trace, b_simple = (e[0] for e in estimates)
    print(f"|G|^2 {g2:.4f} (true {TRUE_G2}), tr {trace:.3f} (true {TRUE_TRACE}), B_simple {b_simple:.2f}")
    assert g2 == pytest.approx(TRUE_G2, rel=TOLERANCE)
    assert trace == pytest.approx(TRUE_TRACE, rel=TOLERANCE)
    assert b_simple == pytest.approx(TRUE_TRACE / TRUE_G2, rel=TOLERANCE)


def test_the_noise_scale_state_is_saved_with_the_step(mirrored, tmp_path):
    def make():
        with mirrored.scope():
            model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])
            optimizer = keras.optimizers.SGD(0.0)
            clip = distclip.ClipStep(optimizer, None, noise_scale=distclip.NoiseScale(global_batch_size=BATCH))
            clip.build(model.trainable_variables)
        return model, clip

    model, clip = make()

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(0.5 * tf.square(model(x) - y)) / BATCH
            clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        mirrored.run(replica_fn, args=(x, y))

    for x, y in _regression_batches(3):
        step(shard(mirrored, x), shard(mirrored, y))
    saved = [float(v) for v in clip.noise]
    path = tf.train.Checkpoint(clip=clip).save(str(tmp_path / "ckpt"))
    _, restored = make()
    tf.train.Checkpoint(clip=restored).restore(path).assert_existing_objects_matched()
    assert [float(v) for v in restored.noise] == saved and int(restored.noise_state["updates"].numpy()) == 3


def test_noise_scale_needs_two_replicas_and_checks_its_arguments():
    with pytest.raises(distclip.ArgumentError, match="global_batch_size=0"):
        distclip.NoiseScale(global_batch_size=0)
    with pytest.raises(distclip.ArgumentError, match="decay=1.0"):
        distclip.NoiseScale(global_batch_size=8, decay=1.0)
    with pytest.raises(distclip.ArgumentError, match="noise_scale=True"):
        distclip.ClipStep(make_optimizer("sgd"), 1.0, noise_scale=True)
    with pytest.raises(distclip.ArgumentError, match="compression='fp16'"):
        distclip.ClipStep(make_optimizer("sgd"), 1.0, noise_scale=distclip.NoiseScale(8), compression="fp16")
    with pytest.raises(distclip.ArgumentError, match=f"global_batch_size must be an integer from 2 to {2 ** 53}"):
        distclip.NoiseScale(global_batch_size=2 ** 64)
    clip = distclip.ClipStep(make_optimizer("sgd"), 1.0, noise_scale=distclip.NoiseScale(8))
    model = make_model()
    # Refused when building (before the first step), and by the step itself if it was never built.
    with pytest.raises(distclip.ContextError, match="at least 2 replicas"):
        clip.build(model.trainable_variables)
    with pytest.raises(distclip.ContextError, match="at least 2 replicas"):
        clip.apply([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    assert int(clip.optimizer.iterations.numpy()) == 0


def test_a_noise_scale_batch_the_replicas_cannot_share_is_refused_when_building(mirrored):
    with mirrored.scope():
        model = make_model()
        clip = distclip.ClipStep(make_optimizer("sgd"), 1.0, noise_scale=distclip.NoiseScale(7))
        with pytest.raises(distclip.ArgumentError, match=r"NoiseScale\(global_batch_size=7\) is not a multiple of "
                                                         "the 2 replicas"):
            clip.build(model.trainable_variables)
    assert clip.nonfinite_replicas is None  # nothing was made


def test_attribution_with_accumulation_names_the_micro_batch_source(mirrored):
    """accumulation_steps=2: replica 1's second micro-batch holds a NaN for variable 1; the update names it."""
    with mirrored.scope():
        model = make_model()
        optimizer = make_optimizer("adam")
        clip = distclip.ClipStep(optimizer, 1.0, accumulation_steps=2, variable_norms=True)
        optimizer.build(model.trainable_variables)
    x, y = global_batch()
    step = _poisoning_step(mirrored, clip, model)
    step(x, y, 1, 1, 0.0)
    result = step(x, y, 1, 1, np.nan)  # the 2nd call: the update, from the state
    for r in mirrored.experimental_local_results(result.nonfinite_replicas):
        assert r.numpy().tolist() == [False, True]
    for v in mirrored.experimental_local_results(result.nonfinite_variables):
        assert v.numpy().tolist() == [False, True, False, False]
    assert int(clip.skipped_steps.numpy()) == 1 and int(optimizer.iterations.numpy()) == 0


def test_a_keras_file_keeps_the_noise_scale_averages(mirrored, tmp_path):
    """`model.save` / `keras.saving.load_model` with a `ClipOptimizer(noise_scale=...)`: the moving averages come
    back as they were (the noise scale's state is among the optimizer's variables Keras saves)."""
    from fitting import data

    x, y = data(3)
    with mirrored.scope():
        model = make_model()
        model.compile(optimizer=distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), 1.0,
                                                             noise_scale=distclip.NoiseScale(GLOBAL_BATCH)),
                      loss="mse")
    model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    with mirrored.scope():
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    want = [float(v) for v in model.optimizer.noise]
    assert want[0] != 0.0 and [float(v) for v in loaded.optimizer.noise] == want
