"""One process of a 2-process run of distclip.keras.ClipOptimizer.

    fit_train.py multiworker|horovod OUT_DIR CLIP_NORM STEPS [ACCUMULATION_STEPS [fp16]]

fp16 (horovod): "mixed_float16" with ClipOptimizer(LossScaleOptimizer(Adam)), and
rank 1's first batch overflows.

horovod: under horovodrun, each rank runs `model.fit` on its own half of every
global batch, with different initial weights that BroadcastCallback replaces
by rank 0's. ClipLogger writes OUT_DIR/log/ on rank 0 only (both backends).
multiworker: `model.fit` under MultiWorkerMirroredStrategy (TF_CONFIG from
distclip.cluster.launcher, or from mpirun's or srun's ranks), which works once ClipOptimizer is created under
the strategy (it installs distclip.keras.fix_multiworker_fit, for keras-team/keras#20585). Writes OUT_DIR/rank{R}.json,
with whether the fix was installed after `import distclip.keras` and after fit.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
backend, out_dir, clip_norm, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
accumulation = int(sys.argv[5]) if len(sys.argv) > 5 else 1
fp16 = len(sys.argv) > 6 and sys.argv[6] == "fp16"
import tensorflow as tf  # noqa: E402

if backend == "multiworker":
    from distclip.cluster.strategies import make_strategy

    # TF_CONFIG from distclip.cluster.launcher, or built from the ranks of mpirun or srun (distclip.cluster.set_tf_config).
    strategy = make_strategy("multiworker", collective_timeout_s=60.0)
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
else:
    import horovod.tensorflow as hvd

    hvd.init()
    strategy, rank = tf.distribute.get_strategy(), hvd.rank()

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distclip  # noqa: E402
import distclip.keras  # noqa: E402
from distclip._src.keras import multiworker_fit  # noqa: E402
from common import GLOBAL_BATCH, global_batch, make_model  # noqa: E402

x, y = (np.concatenate(a) for a in zip(*(global_batch(s) for s in range(steps))))
batch = GLOBAL_BATCH
if backend == "horovod":
    half = GLOBAL_BATCH // 2
    rows = np.concatenate([np.arange(s * GLOBAL_BATCH + rank * half, s * GLOBAL_BATCH + (rank + 1) * half)
                           for s in range(steps)])
    x, y, batch = x[rows], y[rows], half
    if fp16:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
        if rank == 1:
            y[0] = 6e4  # the scaled float16 gradients overflow on this rank only

fixed_at_import = multiworker_fit.installed()
with strategy.scope():
    model = make_model(seed=1 + (rank if backend == "horovod" else 0))
    inner = keras.optimizers.Adam(0.05)
    inner = keras.optimizers.LossScaleOptimizer(inner) if fp16 else inner
    optimizer = distclip.keras.ClipOptimizer(inner, clip_norm, accumulation_steps=accumulation)
    model.compile(optimizer=optimizer, loss="mse", auto_scale_loss=not fp16)
# Under MultiWorkerMirroredStrategy every worker passes the whole global batches and the strategy gives
# each its slice; under Horovod each rank passes its own half. BroadcastCallback: a no-op under tf.distribute.
callbacks = [distclip.keras.BroadcastCallback(), distclip.keras.ClipLogger(os.path.join(out_dir, "log"))]
history = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks).history
# evaluate and predict on held-out global batches (whole on every MWMS worker, as for fit; each rank's own
# under Horovod): the test compares them with the single-device model's.
held_x, held_y = (np.concatenate(a) for a in zip(*(global_batch(100 + s) for s in range(2))))
if backend == "horovod":
    held_x, held_y = held_x[rank::2], held_y[rank::2]
evaluated = model.evaluate(held_x, held_y, batch_size=batch, verbose=0)
predicted = model.predict(held_x, batch_size=batch, verbose=0)

with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "history": history, "iterations": int(optimizer.iterations.numpy()),
               "evaluated": float(evaluated), "predicted": predicted.tolist(),
               "loss_scale": float(inner.dynamic_scale.numpy()) if fp16 else None,
               "keras_fix": [fixed_at_import, multiworker_fit.installed()],
               "weights": [w.tolist() for w in model.get_weights()]}, f)
