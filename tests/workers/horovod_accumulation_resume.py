"""One rank of `horovodrun -np 2`: a checkpoint between accumulated micro-batches is refused, one at an
update resumes bit-identically. Rank 0 saves (as Horovod users do); every rank restores that file.

    horovod_accumulation_resume.py OUT_DIR

Writes OUT_DIR/rank{R}.json: the refusal's message (rank 0), and whether the resumed weights equal
the uninterrupted run's bit for bit.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distclip  # noqa: E402
from common import GLOBAL_BATCH, global_batch, make_model  # noqa: E402

hvd.init()
out_dir = sys.argv[1]
rank, size = hvd.rank(), hvd.size()
per = GLOBAL_BATCH // size


def make():
    model, optimizer = make_model(), keras.optimizers.Adam(0.05)
    clip = distclip.ClipStep(optimizer, 0.2, accumulation_steps=2)
    clip.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    def run(seeds):
        for s in seeds:
            x, y = global_batch(s)
            step(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])

    return model, clip, run


model, clip, run = make()
checkpoint = tf.train.Checkpoint(model=model, clip=clip)
path = os.path.join(out_dir, "ckpt")
refused = None
run([0])
if rank == 0:
    try:
        checkpoint.save(os.path.join(out_dir, "mid"))
    except distclip.ArgumentError as e:
        refused = str(e)
run([1])
if rank == 0:
    saved = checkpoint.write(path)
run([2, 3, 4, 5])  # the updates at 3 and 5 all-reduce: rank 0 has written the file before anyone restores
whole = model.get_weights()

resumed_model, resumed, resumed_run = make()
tf.train.Checkpoint(model=resumed_model, clip=resumed).read(path).assert_existing_objects_matched()
resumed_run([2, 3, 4, 5])
same = all(np.array_equal(a, b) for a, b in zip(whole, resumed_model.get_weights()))
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"refused": refused, "bit_identical": same, "iterations": int(resumed.optimizer.iterations.numpy())}, f)
