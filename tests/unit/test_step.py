"""distclip._src.step: ClipStep under MirroredStrategy equals single-device training with tf.clip_by_global_norm."""
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import (GLOBAL_BATCH, distributed_train, global_batch, make_model, make_optimizer, max_abs_diff, reference_train, shard)


STEPS = 4


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("clip_norm", [0.2, 1e3], ids=["binding", "not-binding"])
def test_clipstep_matches_single_device_reference(mirrored, opt, clip_norm):
    ref_weights, ref_norms = reference_train(clip_norm, STEPS, opt)
    weights, norms, per_replica, _ = distributed_train(mirrored, clip_norm, STEPS, opt)

    assert max_abs_diff(weights, ref_weights) <= 1e-5
    # The reported norm is the synchronized one, the same on both replicas and equal to the reference.
    for (r0, r1), ref in zip(norms, ref_norms):
        assert r0 == r1
        assert r0 == pytest.approx(ref, rel=1e-5)
    if clip_norm < 1:
        assert all(n > clip_norm for n in ref_norms), "the threshold must bind for this case to mean anything"
    else:
        assert all(n < clip_norm for n in ref_norms)


def test_replicas_identical_bit_for_bit(mirrored):
    _, _, per_replica, _ = distributed_train(mirrored, 0.2, STEPS, "adam")
    for values in per_replica:
        assert np.array_equal(values[0], values[1])


def test_keras_global_clipnorm_does_not_match_reference(mirrored):
    """Keras 3 clips each replica's local gradients before its all-reduce: not the global-batch result."""
    ref_weights, _ = reference_train(0.2, STEPS, "sgd")
    keras_weights, _, _, _ = distributed_train(mirrored, 0.2, STEPS, "sgd", mode="keras_global_clipnorm")
    ours, _, _, _ = distributed_train(mirrored, 0.2, STEPS, "sgd")
    assert max_abs_diff(keras_weights, ref_weights) > 1e-2
    assert max_abs_diff(ours, ref_weights) <= 1e-5


def test_clipstep_eagerly_under_mirrored(mirrored):
    """Without tf.function: strategy.run runs replicas in threads and merge_call still applies once."""
    with mirrored.scope():
        model, optimizer = make_model(), make_optimizer("adam")
        clip = distclip.ClipStep(optimizer, 0.2)

    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
        return clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables).global_norm

    for s in range(STEPS):
        x, y = global_batch(s)
        mirrored.run(replica_fn, args=(shard(mirrored, x), shard(mirrored, y)))
    ref_weights, _ = reference_train(0.2, STEPS)
    assert max_abs_diff(model.get_weights(), ref_weights) <= 1e-5
    assert int(optimizer.iterations.numpy()) == STEPS
