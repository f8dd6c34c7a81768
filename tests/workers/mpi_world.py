"""One rank of `mpirun -np 2` with neither Horovod nor a tf.distribute strategy: distclip's MPI backend.

Writes OUT_DIR/rank{R}.json: the backend distclip._src.sync.current found, the variables after
broadcast_from_root, what verify_replicas said before and after rank 1 changed a value, and
what sync_and_clip did with backend="auto" (refused) and backend="none".
"""
import json
import os
import sys

import tensorflow as tf

import distclip
from distclip._src import sync

out = sys.argv[1]
backend = sync.current()
rank = backend.rank()
report = {"backend": [backend.name, backend.num_replicas(), rank, backend.size()]}
v = tf.Variable([float(rank), 10.0 + rank])
distclip.broadcast_from_root([v])
report["broadcast"] = v.numpy().tolist()
report["checksums"] = distclip.verify_replicas([v])
if rank == 1:
    v.assign_add([0.0, 1e-6])
try:
    distclip.verify_replicas([v])
    report["mismatch"] = None
except distclip.ReplicaMismatchError as e:
    report["mismatch"] = str(e)
try:
    distclip.sync_and_clip([tf.constant([3.0, 4.0])], 1.0)
    report["auto"] = None
except distclip.ContextError as e:
    report["auto"] = str(e)
report["none"] = float(distclip.sync_and_clip([tf.constant([3.0, 4.0])], 1.0, backend="none").global_norm)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
