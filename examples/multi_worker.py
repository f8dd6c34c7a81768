"""`model.fit` under MultiWorkerMirroredStrategy, one process per worker, with `ClipOptimizer`.

    python -m distclip.cluster.launcher --nproc 2 -- python examples/multi_worker.py

The local launcher starts the workers, each with its own TF_CONFIG on free loopback ports, and stops them all
(naming the worker) if one fails. Under Slurm or mpirun, `distclip.cluster.set_tf_config()` builds TF_CONFIG
instead (see slurm/multiworker-srun.sbatch). Keras 3.15's own `fit` fails under a multi-worker strategy
(keras-team/keras#20585); a `ClipOptimizer` created under the strategy installs distclip's fix. Every worker
passes the whole global batch to `fit`, and the strategy gives each its slice. The script checks that the
workers end with the same variables and that the loss went down.
"""
import numpy as np
import tensorflow as tf

import distclip

tf_config = distclip.cluster.set_tf_config()   # keeps the launcher's TF_CONFIG; builds one under mpirun or srun
strategy = tf.distribute.MultiWorkerMirroredStrategy()   # before any other TensorFlow op

import keras  # noqa: E402

import distclip.keras  # noqa: E402

rng = np.random.default_rng(0)                           # the same global batch on every worker
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")

with strategy.scope():
    keras.utils.set_random_seed(1)                       # MultiWorkerMirroredStrategy starts every worker alike
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    optimizer = distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.01), clip_norm=1.0)
    model.compile(optimizer=optimizer, loss="mse")
history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, callbacks=[distclip.keras.ClipLogger()],
                    verbose=0)
distclip.verify_replicas(model.variables + optimizer.variables)         # raises if any variable differs
losses = history.history["loss"]
assert losses[-1] < losses[0], losses
print(f"worker {tf_config['task']['index']} of {strategy.num_replicas_in_sync}: "
      f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
      f"mean global norm per epoch {np.round(history.history['global_norm'], 3)}, replicas identical")
