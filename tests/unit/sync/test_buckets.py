"""distclip._src.sync.buckets: gradients sent in buckets, last layers first, equal one packed all-reduce."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import distributed_train, global_batch, max_abs_diff, shard
from distclip._src.sync.buckets import MB, plan
from graphs import collectives


def test_plan_cuts_the_reversed_gradients_at_the_cap():
    grads = [tf.zeros([MB // 4]), tf.zeros([MB // 8]), tf.zeros([MB // 8]), tf.zeros([3 * MB // 4]),
             tf.IndexedSlices(tf.zeros([2, MB // 8]), tf.constant([0, 1]), tf.constant([8, MB // 8]))]
    assert plan(grads, None) == [[0, 1, 2, 3, 4]]
    # Bytes, last first: 4: 1 MB (sparse values), 3: 3 MB, 2: 0.5, 1: 0.5, 0: 1.
    assert plan(grads, 1.0) == [[4], [3], [2, 1], [0]]
    assert plan(grads, 100.0) == [[4, 3, 2, 1, 0]]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "25"])
def test_bucket_mb_is_checked(bad):
    with pytest.raises(distclip.ArgumentError, match=f"bucket_mb must be .auto., None or a positive number of megabytes; "
                                                     f"got bucket_mb={bad!r}"):
        distclip.ClipStep(keras.optimizers.SGD(0.1), 1.0, bucket_mb=bad)


def test_buckets_give_the_packed_result_in_one_collective_per_bucket(mirrored):
    packed = distributed_train(mirrored, 0.2, 3, "adam")
    tiny = distributed_train(mirrored, 0.2, 3, "adam", bucket_mb=1e-6)  # every gradient its own bucket
    assert max_abs_diff(tiny[0], packed[0]) <= 1e-6
    assert np.allclose(tiny[1], packed[1], rtol=1e-6)
    x, y = global_batch()
    sizes = [sorted(n for n, _ in collectives(run[3]["step"].get_concrete_function(
        shard(mirrored, x), shard(mirrored, y)).graph)) for run in (packed, tiny)]
    variables = [int(np.prod(v.shape)) for v in packed[3]["model"].trainable_variables]
    report = mirrored.num_replicas_in_sync + 1  # each replica's flags and sum of squares, in the last collective
    assert sizes[0] == [sum(variables) + report] * 2  # one packed collective per device
    # One per gradient per device: the same elements, the report with the first layer's, which is sent last.
    assert sizes[1] == sorted(([variables[0] + report] + variables[1:]) * 2)
