"""One rank of a Horovod run (horovodrun --gloo/--mpi, mpirun, srun): ClipStep on this rank's shard.

    horovod_train.py OUT_DIR CLIP_NORM STEPS [POISON_STEP [PERTURB]]

Each rank's loss is the mean over its own shard (Horovod's convention; the
backend averages). At POISON_STEP, rank 1's shard holds an inf. With PERTURB=1,
rank 1 nudges one weight before verify_replicas. Writes OUT_DIR/rank{R}.json
with the final weights, norms, skip count, cluster info and what
verify_replicas said.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distclip  # noqa: E402
from common import GLOBAL_BATCH, global_batch, make_model, make_optimizer  # noqa: E402

hvd.init()
out_dir, clip_norm, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
poison = int(sys.argv[4]) if len(sys.argv) > 4 else -1
perturb = len(sys.argv) > 5 and sys.argv[5] == "1"
rank, size = hvd.rank(), hvd.size()
per = GLOBAL_BATCH // size

model, optimizer = make_model(seed=1 + rank), make_optimizer("adam")  # different on purpose: the broadcast fixes it
optimizer.build(model.trainable_variables)
distclip.broadcast_from_root(model.variables + optimizer.variables, root=0)
clip = distclip.ClipStep(optimizer, clip_norm)


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    result = clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return result.global_norm, result.finite


norms = []
for s in range(steps):
    x, y = global_batch(s)
    x = x[rank * per:(rank + 1) * per].copy()
    if s == poison and rank == 1:
        x[0, 0] = np.inf
    norm, finite = train_step(x, y[rank * per:(rank + 1) * per])
    norms.append(float(norm))

if perturb and rank == 1:
    model.trainable_variables[0].assign_add(np.full(model.trainable_variables[0].shape, 1e-7, "float32"))
try:
    distclip.verify_replicas(model.variables + optimizer.variables)
    verified = "ok"
except distclip.ReplicaMismatchError as e:
    verified = str(e)

os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "size": size, "norms": norms, "skipped": int(clip.skipped_steps.numpy()),
               "cluster": vars(distclip.cluster.info()), "env_cluster": vars(distclip.cluster.info(dict(os.environ))),
               "verified": verified,
               "iterations": int(optimizer.iterations.numpy()),
               "weights": [w.tolist() for w in model.get_weights()]}, f)
