"""One process of a 2-process run of distclip.keras.ClipOptimizer.

    fit_train.py multiworker|horovod OUT_DIR CLIP_NORM STEPS [ACCUMULATION_STEPS [fp16]]

fp16 (horovod): "mixed_float16" with ClipOptimizer(LossScaleOptimizer(Adam)), and
rank 1's first batch overflows.

horovod: under horovodrun, each rank runs `model.fit` on its own half of every
global batch, with different initial weights that BroadcastCallback replaces
by rank 0's; ClipLogger writes OUT_DIR/log/ on rank 0 only.
multiworker: MultiWorkerMirroredStrategy (TF_CONFIG from the parent) with
`optimizer.apply` in a custom loop, because Keras 3.15's `fit` itself fails
under MultiWorkerMirroredStrategy before it reaches the optimizer
(keras-team/keras#20585). Writes OUT_DIR/rank{R}.json.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
engine, out_dir, clip_norm, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
accumulation = int(sys.argv[5]) if len(sys.argv) > 5 else 1
fp16 = len(sys.argv) > 6 and sys.argv[6] == "fp16"
import tensorflow as tf  # noqa: E402

if engine == "multiworker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60.0))
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
from common import GLOBAL_BATCH, global_batch, make_model, replica_train_step, shard  # noqa: E402

x, y = (np.concatenate(a) for a in zip(*(global_batch(s) for s in range(steps))))
batch = GLOBAL_BATCH
if engine == "horovod":
    half = GLOBAL_BATCH // 2
    rows = np.concatenate([np.arange(s * GLOBAL_BATCH + rank * half, s * GLOBAL_BATCH + (rank + 1) * half)
                           for s in range(steps)])
    x, y, batch = x[rows], y[rows], half
    if fp16:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
        if rank == 1:
            y[0] = 6e4  # the scaled float16 gradients overflow on this rank only

with strategy.scope():
    model = make_model(seed=1 + (rank if engine == "horovod" else 0))
    inner = keras.optimizers.Adam(0.05)
    inner = keras.optimizers.LossScaleOptimizer(inner) if fp16 else inner
    optimizer = distclip.keras.ClipOptimizer(inner, clip_norm, accumulation_steps=accumulation)
    model.compile(optimizer=optimizer, loss="mse", auto_scale_loss=not fp16)
if engine == "horovod":
    callbacks = [distclip.keras.BroadcastCallback(), distclip.keras.ClipLogger(os.path.join(out_dir, "log"))]
    history = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks).history
else:
    train_step = replica_train_step(strategy, model, optimizer.apply)
    optimizer.build(model.trainable_variables)
    norms, done = [], 0
    for s in range(steps):
        xs, ys = global_batch(s)
        train_step(shard(strategy, xs), shard(strategy, ys))
        if int(optimizer.iterations.numpy()) > done:  # an update happened (every k-th call when accumulating)
            done += 1
            norms.append(float(optimizer.global_norm.numpy()))
    history = {"global_norm": [sum(norms) / len(norms)]}

with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "history": history, "iterations": int(optimizer.iterations.numpy()),
               "loss_scale": float(inner.dynamic_scale.numpy()) if fp16 else None,
               "weights": [w.tolist() for w in model.get_weights()]}, f)
