"""distclip._src.sync.wire: IndexedSlices sent dense, and fp16 compression, for any backend."""
import numpy as np
import pytest
import tensorflow as tf

import distclip


def test_sparse_as_dense_and_fp16_compression(mirrored):
    """Densified slices join the packed all-reduce; fp16 travels, the norm is of the decompressed values."""
    per = [np.array([3.0, 4.0], "float32"), np.array([6.0, 8.0], "float32")]
    dense = mirrored.experimental_distribute_values_from_function(lambda c: tf.constant(per[c.replica_id_in_sync_group]))
    rows = mirrored.experimental_distribute_values_from_function(
        lambda c: tf.constant([[1.0, 2.0]]) if c.replica_id_in_sync_group == 0 else tf.constant([[3.0, -2.0]]))

    def run(**kw):
        def fn(d, v):
            r = distclip.sync_and_clip([d, tf.IndexedSlices(v, tf.constant([1]), tf.constant([3, 2]))], 100.0, **kw)
            sparse = isinstance(r.grads[1], tf.IndexedSlices)
            assert sparse != kw.get("sparse_as_dense", False)
            assert r.grads[0].dtype == tf.float32 and (r.grads[1].values if sparse else r.grads[1]).dtype == tf.float32
            return r.global_norm

        out = tf.function(lambda d, v: mirrored.run(fn, args=(d, v)))(dense, rows)
        return [float(n) for n in mirrored.experimental_local_results(out)]

    want = np.sqrt(9.0 ** 2 + 12.0 ** 2 + 4.0 ** 2 + 0.0 ** 2)  # dense sum [9, 12]; row 1 sums to [4, 0]
    for kw in ({}, {"sparse_as_dense": True}, {"compression": "fp16"}):
        assert run(**kw) == pytest.approx([want, want], rel=1e-6), kw
    with pytest.raises(ValueError, match="compression=.zip."):
        distclip.sync_and_clip([tf.constant([1.0])], 1.0, compression="zip")
