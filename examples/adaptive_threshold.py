"""A threshold that adapts: `distclip.SpikeClip` clips the norms that jump far above their recent history.

    python examples/adaptive_threshold.py

`SpikeClip(z, decay, warmup)` keeps a moving mean and variance of the global norm, in variables updated from
the synchronized norm only (the same on every replica, saved in checkpoints, no host syncs), and clips norms more
than `z` standard deviations above the mean. `distclip.AutoClip(percentile, history)` clips at a percentile of
the recent norms instead. The script trains under MirroredStrategy, corrupts one batch (its targets times 1000),
and checks that this step, and almost no other, is clipped, to an update no larger than the other steps' largest.
"""
import numpy as np
import tensorflow as tf

if not tf.config.list_physical_devices("GPU"):                   # 2 replicas on a CPU-only machine
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import distclip  # noqa: E402

GLOBAL_BATCH, STEPS, SPIKE = 32, 120, 80
rng = np.random.default_rng(0)
x = rng.normal(size=(GLOBAL_BATCH * STEPS, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
y[SPIKE * GLOBAL_BATCH:(SPIKE + 1) * GLOBAL_BATCH] *= 1000.0     # one corrupted batch
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.02)
    clip = distclip.ClipStep(optimizer, clip_norm=distclip.SpikeClip(z=4.0, decay=0.95, warmup=20))


@tf.function
def train_step(x, y):
    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            per_example = tf.square(model(x, training=True) - y)[:, 0]
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        result = clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return result.global_norm, result.scale, result.clipped
    return [strategy.experimental_local_results(v)[0] for v in strategy.run(replica_fn, args=(x, y))]


batches = strategy.experimental_distribute_dataset(dataset)
rows = np.array([[float(v) for v in train_step(xb, yb)] for xb, yb in batches])
norms, scales, clipped = rows[:, 0], rows[:, 1], rows[:, 2].astype(bool)
typical = float(np.median(norms))
print(f"median global norm {typical:.3f}; step {SPIKE}: norm {norms[SPIKE]:.1f}, scale {scales[SPIKE]:.5f} "
      f"(update norm {norms[SPIKE] * scales[SPIKE]:.3f}); steps clipped: {np.flatnonzero(clipped).tolist()}")
assert clipped[SPIKE] and norms[SPIKE] * scales[SPIKE] <= np.delete(norms, SPIKE).max()   # no larger than usual
assert clipped.sum() <= 1 + STEPS // 20                         # the normal steps are (almost) never clipped
distclip.verify_replicas(model.variables + optimizer.variables + list(clip.variables))   # the policy's state too
