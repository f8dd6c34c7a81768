"""A custom training loop under MirroredStrategy with `distclip.ClipStep`.

    python examples/custom_loop.py [LOG_DIR]    # LOG_DIR needs tensorboard: tensorboard --logdir LOG_DIR/tensorboard

Each replica differentiates its share of the global batch; `ClipStep.apply` all-reduces the gradients once,
clips them by the global norm of the synchronized gradients, and applies one update through the optimizer.
A `distclip.ClipReporter` turns each update into a row of LOG_DIR/metrics.csv and TensorBoard (and a line on
stderr for a non-finite update or a rewind). The script checks what that promises: the replicas stay
identical, and the weights equal single-device training on the global batch with `tf.clip_by_global_norm`.
"""
import sys

import numpy as np
import tensorflow as tf

# On a machine without GPUs, split the CPU into 2 logical devices, so that MirroredStrategy has 2 replicas.
# This must happen before TensorFlow initializes its devices.
if not tf.config.list_physical_devices("GPU"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import distclip  # noqa: E402

GLOBAL_BATCH, STEPS, CLIP_NORM = 32, 20, 0.5
rng = np.random.default_rng(0)
x = rng.normal(size=(GLOBAL_BATCH * STEPS, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) * 3.0).astype("float32")        # large targets: early steps get clipped
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def make_model() -> keras.Model:
    keras.utils.set_random_seed(1)                                 # the same initial weights every time
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])


strategy = tf.distribute.MirroredStrategy()
with strategy.scope():                      # the model, the optimizer and ClipStep: all under the scope
    model = make_model()
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)           # no clipnorm / global_clipnorm here
    clip = distclip.ClipStep(optimizer, clip_norm=CLIP_NORM)


@tf.function
def train_step(x, y):
    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            per_example = tf.square(model(x, training=True) - y)[:, 0]
            # The mean over the global batch: the all-reduce's sum is then the global-batch mean gradient.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        return clip.apply(grads, model.trainable_variables)        # all-reduce, clip, update: once
    result = strategy.run(replica_fn, args=(x, y))
    # global_norm is the same on every replica (the norm of the synchronized gradients): take the first.
    return strategy.experimental_local_results(result.global_norm)[0]


log_dir = sys.argv[1] if len(sys.argv) > 1 else None    # None: rows returned and lines on stderr, no files
# Created on every process at the same point (it all-gathers where each replica runs); rank 0 writes.
reporter = distclip.ClipReporter(clip, model.trainable_variables, log_dir=log_dir)
norms, rows = [], []
for xb, yb in strategy.experimental_distribute_dataset(dataset):
    norms.append(float(train_step(xb, yb)))
    rows.append(reporter.report())  # one small read: norm, threshold, scale, action; pass loss= to log it
reporter.close()
assert [row["global_norm"] for row in rows] == norms and reporter.clipped_steps == sum(n > CLIP_NORM for n in norms)
if log_dir:
    print(f"metrics.csv and tensorboard/ in {log_dir}")
print(f"{strategy.num_replicas_in_sync} replicas, {STEPS} steps; global norm before clipping: "
      f"first {norms[0]:.3f}, last {norms[-1]:.3f}; clipped {sum(n > CLIP_NORM for n in norms)} steps")

# The replicas hold the same variables, bit for bit (raises distclip.ReplicaMismatchError otherwise).
distclip.verify_replicas(model.variables + optimizer.variables)

# The same training on one device, on the global batch, with TensorFlow's own clip: the same weights.
reference = make_model()
reference_optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
for xb, yb in dataset:
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(reference(xb, training=True) - yb))
    grads, _ = tf.clip_by_global_norm(tape.gradient(loss, reference.trainable_variables), CLIP_NORM)
    reference_optimizer.apply(grads, reference.trainable_variables)
pairs = zip(model.get_weights(), reference.get_weights(), strict=True)
difference = max(float(np.max(np.abs(a - b))) for a, b in pairs)
print(f"largest difference from single-device training with tf.clip_by_global_norm: {difference:.2e}")
assert difference < 1e-5, difference
