"""What one rewind snapshot costs: ClipStep with a snapshot at every step against ClipStep with none.

MirroredStrategy over 2 logical CPU devices, the MLP of clipstep_overhead.py (5.27M parameters), Adam: a
snapshot copies the weights and both slots (63 MB) into host memory. Both steps are timed in alternating
blocks in this one process; the median difference is the time of one snapshot, so a snapshot every K
steps costs that divided by K per step.

    .venv/bin/python benchmarks/rewind_snapshot.py [--rounds 10] [--steps 10]
"""
from __future__ import annotations

import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from distclip.cluster.strategies import make_strategy  # noqa: E402

strategy = make_strategy("mirrored", replicas=2)  # before any other TensorFlow op

import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402
from bench_common import alternate, arg_parser, build, data, strategy_step  # noqa: E402


def main() -> int:
    parser = arg_parser(__doc__, 256, "global batch")
    parser.set_defaults(rounds=10, steps=10)
    args = parser.parse_args()
    steps, clips = {}, []
    per = args.batch_size // strategy.num_replicas_in_sync
    xs, ys = data(args.batch_size)
    x = strategy.experimental_distribute_values_from_function(
        lambda c: tf.constant(xs[c.replica_id_in_sync_group * per:][:per]))
    y = strategy.experimental_distribute_values_from_function(
        lambda c: tf.constant(ys[c.replica_id_in_sync_group * per:][:per]))
    for name, every in (("no snapshot", 10 ** 9), ("a snapshot every step", 1)):
        with strategy.scope():
            model, optimizer = build(0)
            clip = distclip.ClipStep(optimizer, clip_norm=args.clip_norm, rewind=distclip.Rewind(every=every))
            clip.build(model.trainable_variables)
        clips.append(clip)
        step = strategy_step(strategy, model, optimizer, clip, args.batch_size)
        steps[name] = lambda step=step: step(x, y)
    times, _, _ = alternate(steps, args.rounds, args.steps)
    base, snap = (times[n] for n in steps)
    diffs = [(b - a) * 1e3 for a, b in zip(base, snap)]
    megabytes = clips[0].rewinding.snapshot_bytes() / 1e6
    print("command: " + " ".join([".venv/bin/python", "benchmarks/rewind_snapshot.py"] + sys.argv[1:]))
    print(f"setup: MirroredStrategy x2 (logical CPUs), snapshot of {megabytes:.1f} MB, {args.rounds} rounds of "
          f"{args.steps} steps")
    for name in steps:
        print(f"{name:>24}: median {statistics.median(times[name]) * 1e3:.1f} ms/step")
    q = statistics.quantiles(diffs, n=4)
    print(f"one snapshot: median {statistics.median(diffs):.1f} ms (IQR {q[0]:.1f}-{q[2]:.1f}); "
          f"per step with a snapshot every K steps: that / K")
    return 0


if __name__ == "__main__":
    sys.exit(main())
