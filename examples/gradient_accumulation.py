"""Gradient accumulation with `ClipStep(accumulation_steps=k)`: k micro-batches make one clipped update.

    python examples/gradient_accumulation.py

Each call adds this replica's gradients to local sums, with no communication; every k-th call all-reduces the
sums once, clips their mean by its global norm and applies one update. So k micro-batches of b examples train
exactly like one batch of k*b. The script checks that against `ClipStep` on the large batch, under
MirroredStrategy. (`ClipOptimizer(accumulation_steps=k)` does the same in `fit`.)
"""
import numpy as np
import tensorflow as tf

if not tf.config.list_physical_devices("GPU"):                   # 2 replicas on a CPU-only machine
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import distclip  # noqa: E402

K, MICRO_BATCH, UPDATES = 4, 16, 10
rng = np.random.default_rng(0)
x = rng.normal(size=(K * MICRO_BATCH * UPDATES, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) * 3.0).astype("float32")
strategy = tf.distribute.MirroredStrategy()


def train(batch: int, accumulation_steps: int) -> keras.Model:
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.01)
        clip = distclip.ClipStep(optimizer, clip_norm=1.0, accumulation_steps=accumulation_steps)

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                per_example = tf.square(model(x, training=True) - y)[:, 0]
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch)
            return clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        strategy.run(replica_fn, args=(x, y))

    for xb, yb in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)):
        step(xb, yb)
    assert optimizer.iterations.numpy() == UPDATES, optimizer.iterations.numpy()     # iterations count updates
    distclip.verify_replicas(model.variables + optimizer.variables)
    return model


accumulated = train(MICRO_BATCH, accumulation_steps=K)
large_batch = train(K * MICRO_BATCH, accumulation_steps=1)
pairs = zip(accumulated.get_weights(), large_batch.get_weights(), strict=True)
difference = max(float(np.max(np.abs(a - b))) for a, b in pairs)
print(f"{UPDATES} updates of {K} micro-batches of {MICRO_BATCH} vs {UPDATES} batches of {K * MICRO_BATCH}: "
      f"largest weight difference {difference:.2e}")
assert difference < 1e-5, difference
