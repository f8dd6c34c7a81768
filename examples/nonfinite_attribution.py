"""Which replica and which layer made a step non-finite, per-layer norms and the gradient noise scale, in `fit`.

    python examples/nonfinite_attribution.py [LOG_DIR]    # then: tensorboard --logdir LOG_DIR/tensorboard

Two replicas (two logical CPUs on a machine without GPUs). One sample of step 3's batch is NaN, and it falls in
the second replica's half, so that replica's own gradients are NaN; after the all-reduce every replica skips
the step together, and `ClipLogger` prints where it came from:

    distclip: step 3 skipped: non-finite gradients from replica 1 (worker 0, host HOST, CPU:1) in dense/kernel, ...

`ClipOptimizer(variable_norms=True)` keeps each variable's synchronized norm, and `noise_scale=` the gradient
noise scale B_simple. With LOG_DIR (and the tensorboard package), `ClipLogger` also writes
`LOG_DIR/nonfinite.csv`, `LOG_DIR/layer_norms.csv` every 4 updates, and TensorBoard: the text `nonfinite`,
scalars `layer_norm/<layer>` and `noise/b_simple`, and a `variable_norms` histogram.
The script checks the replica it names and that the per-layer norms make up the global norm.
"""
import sys

import numpy as np
import tensorflow as tf

if not tf.config.list_physical_devices("GPU"):                   # 2 replicas on a CPU-only machine
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import distclip  # noqa: E402
import distclip.keras  # noqa: E402

log_dir = sys.argv[1] if len(sys.argv) > 1 else None
BATCH = 64
rng = np.random.default_rng(0)
x = rng.normal(size=(16 * BATCH, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
x[3 * BATCH + BATCH - 1, 0] = np.nan                              # step 3, the last sample: replica 1's half

strategy = tf.distribute.MirroredStrategy()
assert strategy.num_replicas_in_sync == 2, "this example expects 2 replicas"
with strategy.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    optimizer = distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.01), clip_norm=5.0, variable_norms=True,
                                             noise_scale=distclip.NoiseScale(global_batch_size=BATCH))
    model.compile(optimizer=optimizer, loss="mse")
logger = distclip.keras.ClipLogger(log_dir, variable_norms_every=4 if log_dir else 0)
model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])

(record,) = logger.nonfinite
assert record.step == 3 and record.skipped and [p.replica for p in record.replicas] == [1], record
assert int(optimizer.skipped_steps.numpy()) == 1
norms = optimizer.variable_norms.numpy()                           # the last update's, one per variable
assert np.isclose(np.sqrt(np.sum(norms ** 2)), float(optimizer.global_norm.numpy()), rtol=1e-5)
for variable, norm in zip(model.trainable_variables, norms, strict=True):
    print(f"  {variable.path:16s} {norm:.4f}")
print(f"gradient noise scale B_simple: {float(optimizer.noise.b_simple):.1f} examples (global batch {BATCH})")
print(f"named: step {record.step} from replica {record.replicas[0].replica} on {record.replicas[0].device}, "
      f"variables {', '.join(record.variables)}")
