"""One rank: sync_and_clip on an embedding-style IndexedSlices (repeated indices) plus a dense gradient,
as Horovod all-gathers it by default, densified (sparse_as_dense=True), with fp16 compression, and in buckets.
Writes OUT_DIR/rank{R}.json: for each mode, the norm, whether the result stayed sparse, and the dense result."""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402

hvd.init()
rank = hvd.rank()
values = tf.constant([[1.0 + rank, 2.0], [3.0, -1.0 - rank], [0.5, 0.5]])
indices = tf.constant([0, 2, 2] if rank == 0 else [2, 5, 5])
dense = tf.constant([1.0, -2.0 * (rank + 1), 0.5])
out = {}
modes = {"sparse": {}, "dense": {"sparse_as_dense": True}, "fp16": {"compression": "fp16"},
         "buckets": {"bucket_mb": 1e-6}}  # each gradient its own grouped all-reduce, the dense one first
for mode, kwargs in modes.items():
    @tf.function
    def step():
        # tf.identity: inside a traced step gradients are graph tensors, as tape.gradient gives them.
        slices = tf.IndexedSlices(tf.identity(values), tf.identity(indices), tf.constant([6, 2]))
        r = distclip.sync_and_clip([slices, tf.identity(dense)], 1.0, **kwargs)
        return r.global_norm, tf.convert_to_tensor(r.grads[0]), r.grads[1], isinstance(r.grads[0], tf.IndexedSlices)

    norm, emb, d, sparse = step()
    out[mode] = {"norm": float(norm), "emb": emb.numpy().tolist(), "dense": d.numpy().tolist(), "sparse": bool(sparse)}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
