"""`model.fit` under MirroredStrategy with `distclip.keras.ClipOptimizer`.

    python examples/keras_fit.py

`ClipOptimizer` wraps any Keras optimizer: `fit` hands it each replica's gradients, and it all-reduces them once,
clips them by the global norm of the synchronized gradients and applies one update. Keras's own `global_clipnorm`
clips each replica's local gradients before the all-reduce instead. The script checks that `fit` with
`ClipOptimizer` on 2 replicas equals single-device `fit` with `global_clipnorm`, and that `ClipLogger` put the
norm in the logs.
"""
import numpy as np
import tensorflow as tf

if not tf.config.list_physical_devices("GPU"):                   # 2 replicas on a CPU-only machine
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import distclip.keras  # noqa: E402  (registers ClipOptimizer with Keras, so that saved models load)

CLIP_NORM = 1.0
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) * 3.0).astype("float32")


def make_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])


strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    model = make_model()
    optimizer = distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.01), clip_norm=CLIP_NORM)
    model.compile(optimizer=optimizer, loss="mse")
logger = distclip.keras.ClipLogger()       # ClipLogger("runs/fit") also writes metrics.csv and TensorBoard
history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, callbacks=[logger], verbose=0)
print(f"{strategy.num_replicas_in_sync} replicas: loss {history.history['loss'][0]:.3f} -> "
      f"{history.history['loss'][-1]:.3f}; mean global norm per epoch {np.round(history.history['global_norm'], 3)}; "
      f"{logger.clipped_steps} of {optimizer.iterations.numpy()} steps clipped")
assert len(history.history["global_norm"]) == 3 and logger.clipped_steps > 0

# Single-device fit with Keras's global_clipnorm, which is right on one device: the same weights.
reference = make_model()
reference.compile(optimizer=keras.optimizers.Adam(0.01, global_clipnorm=CLIP_NORM), loss="mse")
reference.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
pairs = zip(model.get_weights(), reference.get_weights(), strict=True)
difference = max(float(np.max(np.abs(a - b))) for a, b in pairs)
print(f"largest difference from single-device fit with global_clipnorm: {difference:.2e}")
assert difference < 1e-5, difference
