"""The global norm in TensorBoard: `ClipLogger(log_dir)` with `model.fit`, read back as TensorBoard reads it.

    python examples/tensorboard_norm.py [LOG_DIR]        # then: tensorboard --logdir LOG_DIR/tensorboard

Needs the tensorboard package (TensorFlow 2.21's wheel no longer brings it: `pip install tensorboard`).
`ClipLogger` writes, from the process of rank 0, one row per update to `LOG_DIR/metrics.csv` and the same
scalars to TensorBoard event files under `LOG_DIR/tensorboard`: `global_norm` (synchronized, before clipping),
`clip_norm` (the threshold), `scale` (the factor applied), `skipped`, and `loss`. Choosing a threshold: train a
few hundred steps with a large one, look at `global_norm`, and pick a value a little above its running median.
The script checks that TensorBoard sees a `global_norm` for every step, equal to the CSV's.
"""
import csv
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

if not tf.config.list_physical_devices("GPU"):                   # 2 replicas on a CPU-only machine
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import distclip.keras  # noqa: E402

log_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="distclip-tensorboard-")
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) * 3.0).astype("float32")

strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.01), clip_norm=5.0), loss="mse")
model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[distclip.keras.ClipLogger(log_dir)])

# What TensorBoard shows: the scalars in the event files.
events = EventAccumulator(os.path.join(log_dir, "tensorboard"), size_guidance={"tensors": 0})  # 0: keep all
events.Reload()
in_tensorboard = {int(e.step): float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("global_norm")}
with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
    in_csv = {int(float(r["step"])): float(r["global_norm"]) for r in csv.DictReader(f)}
print(f"{len(in_tensorboard)} steps of global_norm in {log_dir}/tensorboard (tags: {events.Tags()['tensors']}); "
      f"first {in_tensorboard[0]:.3f}, last {in_tensorboard[max(in_tensorboard)]:.3f}")
assert sorted(in_tensorboard) == list(range(16)), sorted(in_tensorboard)      # 2 epochs of 8 steps
assert all(np.isclose(in_tensorboard[s], in_csv[s], rtol=1e-6) for s in in_tensorboard)
print(f"view them with: tensorboard --logdir {log_dir}/tensorboard")
