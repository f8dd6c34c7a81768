"""distclip._src.lockstep: a step whose synchronized norm is not finite is skipped on every replica together (or raises, or propagates)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
from common import (GLOBAL_BATCH, distributed_train, global_batch, make_model, max_abs_diff, reference_train,
                    replica_values, shard)


def _poisoned(seed=0):
    x, y = global_batch(seed)
    x = x.copy()
    x[-1, 0] = np.inf  # the last example lives on replica 1 only
    return x, y


def _regime(strategy):
    seen = []
    tf.function(lambda: strategy.run(lambda: seen.append(tf.__internal__.distribute.strategy_supports_no_merge_call())))()
    return seen


@pytest.mark.parametrize("regime", ["mirrored", "no_merge_call"])
def test_skip_on_every_replica_then_train_normally(request, regime):
    mirrored = request.getfixturevalue(regime)
    assert _regime(mirrored) == [regime == "no_merge_call"] * 2
    weights, norms, per_replica, objs = distributed_train(mirrored, 0.2, 1, batches=[global_batch(0)])
    model, optimizer, clip, step = objs["model"], objs["optimizer"], objs["clip"], objs["step"]

    before_vars = replica_values(mirrored, model.trainable_variables)
    before_opt = replica_values(mirrored, optimizer.variables)
    out = step(shard(mirrored, _poisoned()[0]), shard(mirrored, _poisoned()[1]))
    reported = [float(v) for v in mirrored.experimental_local_results(out)]
    assert all(not np.isfinite(v) for v in reported), reported

    after_vars = replica_values(mirrored, model.trainable_variables)
    after_opt = replica_values(mirrored, optimizer.variables)
    for b, a in zip(before_vars + before_opt, after_vars + after_opt):
        for rb, ra in zip(b, a):
            assert np.array_equal(rb, ra)
    assert int(np.array(mirrored.experimental_local_results(optimizer.iterations.value)[0])) == 1
    assert [int(v) for v in mirrored.experimental_local_results(clip.skipped_steps)] == [1, 1]

    # The next finite step trains as if the poisoned step never happened.
    step(shard(mirrored, global_batch(1)[0]), shard(mirrored, global_batch(1)[1]))
    ref_weights, _ = reference_train(0.2, 2, batches=[global_batch(0), global_batch(1)])
    assert max_abs_diff(model.get_weights(), ref_weights) <= 1e-5
    final = replica_values(mirrored, model.trainable_variables)
    assert all(np.array_equal(v[0], v[1]) for v in final)


def test_raise_fails_the_step_and_changes_nothing(mirrored):
    _, _, _, objs = distributed_train(mirrored, 0.2, 1, batches=[global_batch(0)], nonfinite="raise")
    model, optimizer, step = objs["model"], objs["optimizer"], objs["step"]

    before = replica_values(mirrored, model.trainable_variables + optimizer.variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="global gradient norm is not finite"):
        step(shard(mirrored, _poisoned()[0]), shard(mirrored, _poisoned()[1]))
    after = replica_values(mirrored, model.trainable_variables + optimizer.variables)
    for b, a in zip(before, after):
        assert all(np.array_equal(rb, ra) for rb, ra in zip(b, a))


def test_propagate_applies_what_tf_clip_by_global_norm_gives(mirrored):
    """nonfinite="propagate": the update is SGD's own on tf.clip_by_global_norm's output for the same gradients
    (NaN everywhere), on every replica; the step counts as applied, not skipped."""
    _, _, _, objs = distributed_train(mirrored, 0.2, 1, batches=[global_batch(0)], opt="sgd", nonfinite="propagate")
    model, optimizer, step = objs["model"], objs["optimizer"], objs["step"]
    x, y = _poisoned()
    before = [w.copy() for w in model.get_weights()]
    step(shard(mirrored, x), shard(mirrored, y))

    # The oracle: one device, the global batch, tf.clip_by_global_norm, then SGD's own apply.
    reference = make_model()
    reference.set_weights(before)
    sgd = keras.optimizers.SGD(float(optimizer.learning_rate.numpy()))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(reference(x) - y)) / GLOBAL_BATCH
    grads, norm = tf.clip_by_global_norm(tape.gradient(loss, reference.trainable_variables), 0.2)
    assert not np.isfinite(norm.numpy())
    sgd.apply(grads, reference.trainable_variables)
    for ours, theirs in zip(replica_values(mirrored, model.trainable_variables), reference.get_weights()):
        for replica in ours:  # NaN where the reference has NaN, the same value elsewhere
            np.testing.assert_array_equal(replica, theirs)
    assert int(np.array(mirrored.experimental_local_results(optimizer.iterations.value)[0])) == 2  # 1 before
    assert [int(v) for v in mirrored.experimental_local_results(objs["clip"].skipped_steps)] == [0, 0]


def _backend(name, mirrored):
    return {} if name == "none" else dict(strategy=mirrored, replicas=2)


#: The fast tier's skips under MirroredStrategy: each SKIP_CASES optimizer once, and with the no-merge-call cases
#: below Adam and LossScaleOptimizer through both APIs (what the API changes does not depend on the merge call).
FAST_SKIPS = {("Adam", "ClipOptimizer"), ("Nadam", "ClipStep"), ("LossScaleOptimizer", "ClipStep")}


def _skip_cases():
    """(backend, name, API): FAST_SKIPS under MirroredStrategy; the rest, and one device, `slow` (the lockstep is the
    mirrored case's; fast one-device skips: test_update.py, test_threshold.py)."""
    return [pytest.param(backend, name, api, id=f"{api}-{name}-{backend}",
                         marks=() if backend == "mirrored" and (name, api) in FAST_SKIPS else pytest.mark.slow)
            for api in contract.APIS for name in contract.SKIP_CASES for backend in ("none", "mirrored")]


@pytest.mark.parametrize("backend,name,api", _skip_cases())
def test_nonfinite_step_is_skipped_on_every_replica(mirrored, backend, name, api):
    found, _ = contract.check_skip(name, api, True, **_backend(backend, mirrored))
    assert not found, found


@pytest.mark.parametrize("name, api", [("Adam", "ClipStep"), ("LossScaleOptimizer", "ClipOptimizer")])
def test_nonfinite_step_is_skipped_where_the_strategy_needs_no_merge_call(no_merge_call, name, api):
    found, _ = contract.check_skip(name, api, True, strategy=no_merge_call, replicas=2)
    assert not found, found
