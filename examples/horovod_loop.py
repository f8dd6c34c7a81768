"""A custom training loop under Horovod with `distclip.ClipStep`: one process per replica.

    horovodrun -np 2 python examples/horovod_loop.py         # or: mpirun -np 2 python examples/horovod_loop.py

Horovod's last release does not build against TensorFlow 2.19 and later; `bash scripts/install-horovod.sh
$(which python)` builds it, with our patch, against the TensorFlow of your environment.
Each rank differentiates the mean loss over its own shard (Horovod's convention); `ClipStep` sums the gradients
in one `hvd.grouped_allreduce`, folds the average's 1/n into the clip and applies one update. The script checks
that every rank saw the same global norm and ends with the same variables.
"""
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import distclip

hvd.init()
distclip.cluster.pin_gpu()                       # one GPU per process, by local rank (nothing on a CPU machine)

import keras  # noqa: E402

BATCH_PER_RANK, STEPS = 16, 20
rng = np.random.default_rng(0)                   # the same data on every rank; each takes its own shard
x = rng.normal(size=(BATCH_PER_RANK * hvd.size() * STEPS, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) * 3.0).astype("float32")
shard = tf.data.Dataset.from_tensor_slices((x, y)).shard(hvd.size(), hvd.rank()).batch(BATCH_PER_RANK)

keras.utils.set_random_seed(hvd.rank())          # different initial weights on purpose: the broadcast fixes them
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
optimizer = keras.optimizers.Adam(0.01)
clip = distclip.ClipStep(optimizer, clip_norm=1.0)
clip.build(model.trainable_variables)                                   # the optimizer's and the step's state
distclip.broadcast_from_root(model.variables + optimizer.variables)      # rank 0's start everywhere


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))   # the mean over this rank's shard
    result = clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return result.global_norm


norms = np.array([float(train_step(xb, yb)) for xb, yb in shard])
# Every rank computed the norm of the same synchronized gradients: gather them and compare.
all_norms = hvd.allgather(tf.constant(norms[None, :])).numpy()
assert (all_norms == all_norms[0]).all(), all_norms
distclip.verify_replicas(model.variables + optimizer.variables)          # raises if any variable differs
if hvd.rank() == 0:
    print(f"{hvd.size()} ranks, {STEPS} steps: the same global norm on every rank (first {norms[0]:.3f}, "
          f"last {norms[-1]:.3f}), and the same {len(model.variables + optimizer.variables)} variables")
