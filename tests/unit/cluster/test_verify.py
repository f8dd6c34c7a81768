"""distclip.cluster.verify: checksums that see every bit, compared across replicas."""
import numpy as np
import pytest
import tensorflow as tf

import distclip
from distclip.cluster.verify import checksum


def test_checksum_sees_every_bit_and_order():
    a = tf.constant(np.arange(10, dtype="float32"))
    assert int(checksum(a)) == int(checksum(tf.identity(a)))
    nudged = a.numpy().copy()
    nudged[3] = np.nextafter(nudged[3], np.float32(10))
    swapped = a.numpy()[[1, 0] + list(range(2, 10))]
    assert int(checksum(tf.constant(nudged))) != int(checksum(a))
    assert int(checksum(tf.constant(swapped))) != int(checksum(a))
    for dtype in (tf.float16, tf.bfloat16, tf.float64, tf.int64):
        assert checksum(tf.cast(a, dtype)).dtype == tf.int64


def test_verify_replicas_under_mirrored(mirrored):
    with mirrored.scope():
        v = tf.Variable(np.arange(6, dtype="float32"), name="v")
        w = tf.Variable(np.ones(3, "float16"), name="w")
    sums = distclip.verify_replicas([v, w])
    assert len(sums) == 2
    w.values[1].assign(np.array([1, 1, 1.001], "float16"))
    with pytest.raises(distclip.ReplicaMismatchError, match=r"variable 'w:0' differs across replicas: checksums by replica \[\d+, \d+\]"):
        distclip.verify_replicas([v, w])
    assert distclip.verify_replicas([tf.Variable([1.0])]) == [int(checksum(tf.constant([1.0])))]
