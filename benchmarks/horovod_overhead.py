"""Under Horovod: ClipStep against the pattern users write today.

Today's pattern: `hvd.allreduce` per gradient (Average), `tf.clip_by_global_norm`,
`optimizer.apply`. Same MLP of 5.27M parameters, Adam, same data on every
rank; both steps traced and warmed up, then timed in alternating blocks on
every rank in lockstep. Rank 0 prints the median per-round ratio.

    .venv/bin/horovodrun --gloo -np 2 -H localhost:2 .venv/bin/python benchmarks/horovod_overhead.py
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402
from bench_common import alternate, arg_parser, build, data, horovod_step, horovod_report  # noqa: E402


def main() -> int:
    args = arg_parser(__doc__, 128, "batch per rank").parse_args()
    hvd.init()

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = (tf.constant(a) for a in data(args.batch_size, seed=hvd.rank()))
    today_model, today_opt = build(0)
    clip_model, clip_opt = build(0)
    clip = distclip.ClipStep(clip_opt, clip_norm=args.clip_norm, nonfinite=args.nonfinite)

    @tf.function
    def today():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, today_model(x, training=True))
        grads = tape.gradient(loss, today_model.trainable_variables)
        grads = [hvd.allreduce(g, op=hvd.Average) for g in grads]
        grads, norm = tf.clip_by_global_norm(grads, args.clip_norm)
        today_opt.apply(grads, today_model.trainable_variables)
        return loss, norm

    ours = horovod_step(clip_model, clip_opt, clip, x, y)

    times, ratios, norms = alternate({"hvd.allreduce + clip + apply": today, "ClipStep": ours}, args.rounds, args.steps)
    horovod_report("horovod_overhead.py", clip_model, args, times, ratios, norms, "<= 1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
