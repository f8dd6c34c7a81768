"""Under Horovod: ClipStep's one grouped all-reduce after the backward pass, against buckets sent as they are ready.

`bucket_mb=B` sends the gradients last layers first in buckets of at most B MB, so Horovod can reduce the last
layers while the first are still being differentiated (distclip._src.sync.buckets); the default is one grouped
all-reduce. For an MLP of 5.27M parameters and one of 50.4M, both ways are traced and warmed up, then timed in
alternating blocks on every rank in lockstep. Rank 0 prints the median per-round ratio buckets / one group.

    .venv/bin/horovodrun --gloo -np 2 -H localhost:2 .venv/bin/python benchmarks/horovod_buckets.py [--bucket-mb 25]
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402
from bench_common import alternate, arg_parser, build, data, horovod_step, horovod_report  # noqa: E402

MODELS = {"5M": dict(hidden=2048, layers=2), "50M": dict(hidden=4096, layers=4)}


def main() -> int:
    p = arg_parser(__doc__, 64, "batch per rank")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size (PyTorch DDP's default is 25 MB)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    hvd.init()
    x, y = (tf.constant(a) for a in data(args.batch_size, seed=hvd.rank()))
    for name in args.models:
        steps = {}
        for label, bucket_mb in (("one group", None), (f"buckets of {args.bucket_mb:g} MB", args.bucket_mb)):
            model, optimizer = build(0, **MODELS[name])
            clip = distclip.ClipStep(optimizer, clip_norm=args.clip_norm, bucket_mb=bucket_mb)
            steps[label] = horovod_step(model, optimizer, clip, x, y)
        times, ratios, norms = alternate(steps, args.rounds, args.steps)
        horovod_report("horovod_buckets.py", model, args, times, ratios, norms, "< 1.0 to make buckets the default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
