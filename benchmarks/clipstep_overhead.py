"""Step time of ClipStep against the same step without clipping (plain optimizer.apply).

MirroredStrategy over 2 logical CPU devices, an MLP of 5.27M parameters, Adam.
Both steps are traced and warmed up, then timed in alternating blocks
(A B, B A, ...) in this one process, so machine noise hits both alike. Prints
the median per-round ratio ClipStep / plain with its spread.

    .venv/bin/python benchmarks/clipstep_overhead.py [--rounds 20] [--steps 20] [--clip-norm 0.1] [--rewind K]

With `--rewind K` the ClipStep has `rewind=distclip.Rewind(every=K)`; with no spike
and K beyond the steps timed, that is the step without a rewind and without a snapshot.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from distclip.cluster.strategies import make_strategy  # noqa: E402

strategy = make_strategy("mirrored", replicas=2)  # before any other TensorFlow op

import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402
from bench_common import alternate, arg_parser, build, data, report, strategy_step  # noqa: E402


def main() -> int:
    parser = arg_parser(__doc__, 256, "global batch")
    parser.add_argument("--rewind", type=int, default=0, metavar="K", help="ClipStep(rewind=Rewind(every=K)); 0: off")
    args = parser.parse_args()
    rewind = distclip.Rewind(every=args.rewind) if args.rewind else None

    with strategy.scope():
        plain_model, plain_opt = build(0)
        clip_model, clip_opt = build(0)
        clip = distclip.ClipStep(clip_opt, clip_norm=args.clip_norm, nonfinite=args.nonfinite, rewind=rewind)
    params = sum(int(tf.size(v)) for v in plain_model.trainable_variables)

    per = args.batch_size // strategy.num_replicas_in_sync
    xs, ys = data(args.batch_size)
    x = strategy.experimental_distribute_values_from_function(lambda c: tf.constant(xs[c.replica_id_in_sync_group * per:][:per]))
    y = strategy.experimental_distribute_values_from_function(lambda c: tf.constant(ys[c.replica_id_in_sync_group * per:][:per]))
    plain = strategy_step(strategy, plain_model, plain_opt, None, args.batch_size)
    ours = strategy_step(strategy, clip_model, clip_opt, clip, args.batch_size)

    times, ratios, norms = alternate({"plain optimizer.apply": lambda: plain(x, y), "ClipStep": lambda: ours(x, y)},
                                     args.rounds, args.steps)
    report(" ".join([".venv/bin/python", "benchmarks/clipstep_overhead.py"] + sys.argv[1:]),
           f"MirroredStrategy x{strategy.num_replicas_in_sync} (logical CPUs), MLP {params / 1e6:.2f}M params, Adam, "
           f"global batch {args.batch_size}, {args.rounds} alternating rounds of {args.steps} steps"
           + (f", rewind every {args.rewind}" if args.rewind else ""),
           times, ratios, norms, args.clip_norm, "<= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
