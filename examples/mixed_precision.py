"""Mixed precision (float16) with a dynamic loss scale, `model.fit` and `ClipOptimizer`, under MirroredStrategy.

    python examples/mixed_precision.py

The `LossScaleOptimizer` goes inside the `ClipOptimizer`, and `compile(auto_scale_loss=False)` stops Keras from
wrapping it in another one. `fit` scales the loss by the dynamic scale S; distclip all-reduces the scaled
gradients, takes the norm of the unscaled ones, skips the step on every replica if that synchronized norm is not
finite, and unscales and clips in one multiply. The script checks that the replicas agree (the loss scale
included) and that float16 training lands close to the same training in float32.
"""
import numpy as np
import tensorflow as tf

if not tf.config.list_physical_devices("GPU"):                   # 2 replicas on a CPU-only machine
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import distclip  # noqa: E402
import distclip.keras  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(size=(512, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
strategy = tf.distribute.MirroredStrategy()


def train(policy: str) -> keras.Model:
    keras.mixed_precision.set_dtype_policy(policy)
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(1, dtype="float32")])   # float32 outputs for the loss
        inner = keras.optimizers.Adam(0.01)
        if policy == "mixed_float16":
            inner = keras.optimizers.LossScaleOptimizer(inner)
        optimizer = distclip.keras.ClipOptimizer(inner, clip_norm=1.0)
        model.compile(optimizer=optimizer, loss="mse", auto_scale_loss=False)
    history = model.fit(x, y, batch_size=64, epochs=5, shuffle=False, verbose=0)
    distclip.verify_replicas(model.variables + optimizer.variables)      # the loss scale is among them
    print(f"{policy}: loss {history.history['loss'][0]:.4f} -> {history.history['loss'][-1]:.4f}")
    return model


mixed = train("mixed_float16")
reference = train("float32")
assert mixed.layers[0].compute_dtype == "float16" and reference.layers[0].compute_dtype == "float32"
pairs = zip(mixed.get_weights(), reference.get_weights(), strict=True)
difference = max(float(np.max(np.abs(a.astype("float32") - b))) for a, b in pairs)
print(f"largest difference between float16 and float32 weights: {difference:.4f}")
assert difference < 0.05, difference
