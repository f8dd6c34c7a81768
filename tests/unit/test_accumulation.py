"""distclip._src.accumulation: k micro-batches accumulated locally, then one reduction, one clip, one update."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import (GLOBAL_BATCH, distributed_train, global_batch, make_model, max_abs_diff, reference_train,
                    replica_train_step, replica_values, shard)
from fitting import CLIP, data, fit, keras_adam
from graphs import collectives, host_round_trips


K = 2


def _pairs(updates):
    """`updates` batches of K * 16 examples: micro-batches 2u and 2u+1 joined."""
    micro = [global_batch(s) for s in range(updates * K)]
    return micro, [tuple(np.concatenate(a) for a in zip(*micro[u * K:(u + 1) * K])) for u in range(updates)]


@pytest.mark.parametrize("regime", ["mirrored", "no_merge_call"])
def test_clipstep_accumulation_equals_one_step_on_a_k_times_larger_batch(request, regime):
    mirrored = request.getfixturevalue(regime)  # no_merge_call: the regime of GPUs under XLA (tests/conftest.py)
    micro, joined = _pairs(3)
    weights, norms, per_replica, objs = distributed_train(mirrored, CLIP, 0, "adam", batches=micro, accumulation_steps=K)
    ref_weights, ref_norms = reference_train(CLIP, 3, "adam", batches=joined)
    assert max_abs_diff(weights, ref_weights) <= 1e-5
    assert int(objs["optimizer"].iterations.numpy()) == 3
    # Each call returns the latest update's result: the reference's norm after every K-th micro-batch.
    assert [n[0] for n in norms[K - 1::K]] == pytest.approx(ref_norms, rel=1e-5)
    assert all(n > CLIP for n in ref_norms)
    for values in per_replica:
        assert all(np.array_equal(values[0], v) for v in values[1:])
    # Nothing is left in the accumulators after the last update.
    for s in objs["clip"].accumulation.sums:
        assert all(np.all(np.asarray(x) == 0) for x in mirrored.experimental_local_results(s))


def test_accumulation_keeps_one_packed_reduction(mirrored):
    x, y = global_batch()
    counts = {}
    for k in (1, K):
        _, _, _, objs = distributed_train(mirrored, CLIP, 0, "adam", batches=[], accumulation_steps=k)
        concrete = objs["step"].get_concrete_function(shard(mirrored, x), shard(mirrored, y))
        counts[k] = collectives(concrete.graph)
    every_step, kth_step = counts[1], counts[K]
    assert len(every_step) == mirrored.num_replicas_in_sync and all(depth == 0 for _, depth in every_step)
    # The same elements, in one collective per device, now inside the k-th call's branch (a nested function).
    assert sorted(n for n, _ in kth_step) == sorted(n for n, _ in every_step)
    assert all(depth > 0 for _, depth in kth_step)


@pytest.mark.parametrize("where", ["default", "mirrored"])
def test_clip_optimizer_accumulation_matches_fit_on_a_larger_batch(mirrored, where):
    x, y = data(4)
    ref = make_model()
    ref.compile(optimizer=keras_adam(global_clipnorm=CLIP)(), loss="mse")
    ref.fit(x, y, batch_size=K * GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    model, optimizer, history = fit(
        lambda: distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), CLIP, accumulation_steps=K),
        mirrored if where == "mirrored" else None, x=x, y=y)
    assert max_abs_diff(model.get_weights(), ref.get_weights()) <= 1e-5
    assert int(optimizer.iterations.numpy()) == 2


def test_accumulation_compiles_under_xla():
    x, y = global_batch(0)
    model = make_model()
    step = distclip.ClipStep(keras.optimizers.SGD(0.1), CLIP, accumulation_steps=K)

    @tf.function(jit_compile=True)
    def train():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        return step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables).global_norm

    norms = [float(train()) for _ in range(4)]
    assert not host_round_trips(train.get_concrete_function().graph)
    ref_weights, ref_norms = reference_train(CLIP, 2, "sgd", batches=[(np.concatenate([x, x]), np.concatenate([y, y]))] * 2)
    assert max_abs_diff(model.get_weights(), ref_weights) <= 1e-5
    assert norms[1] == pytest.approx(ref_norms[0], rel=1e-5) and norms[3] == pytest.approx(ref_norms[1], rel=1e-5)


def _accumulating(strategy, api):
    """A model and ClipStep/ClipOptimizer with accumulation_steps=K, built, and its distributed step."""
    with strategy.scope():
        model = make_model()
        inner = keras.optimizers.Adam(0.05)
        if api == "ClipStep":
            wrapper = distclip.ClipStep(inner, CLIP, accumulation_steps=K)
        else:
            wrapper = distclip.keras.ClipOptimizer(inner, CLIP, accumulation_steps=K)
        wrapper.build(model.trainable_variables)
    step = replica_train_step(strategy, model, wrapper.apply)

    def run(seeds):
        for s in seeds:
            x, y = global_batch(s)
            step(shard(strategy, x), shard(strategy, y))

    return model, wrapper, run


@pytest.mark.parametrize("api", ["ClipStep", "ClipOptimizer"])
def test_a_checkpoint_between_updates_is_refused_and_one_at_an_update_resumes_exactly(mirrored, tmp_path, api):
    model, wrapper, run = _accumulating(mirrored, api)
    checkpoint = tf.train.Checkpoint(model=model, clip=wrapper)
    assert wrapper.pending_micro_batches == 0 and not wrapper.applies_next
    run([0])
    assert wrapper.pending_micro_batches == 1 and wrapper.applies_next
    with pytest.raises(distclip.ArgumentError, match="between updates: 1 of accumulation_steps=2 micro-batches"):
        checkpoint.save(str(tmp_path / "mid"))
    run([1])
    assert wrapper.pending_micro_batches == 0
    path = checkpoint.save(str(tmp_path / "boundary"))
    run([2, 3, 4, 5])
    whole = [np.array(w) for w in model.get_weights()]

    resumed_model, resumed, resumed_run = _accumulating(mirrored, api)
    tf.train.Checkpoint(model=resumed_model, clip=resumed).restore(path).assert_consumed()
    resumed_run([2, 3, 4, 5])
    assert all(np.array_equal(a, b) for a, b in zip(whole, resumed_model.get_weights()))
    for values in replica_values(mirrored, resumed_model.trainable_variables):
        assert all(np.array_equal(values[0], v) for v in values[1:])
