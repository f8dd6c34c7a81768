"""What `distclip.ClipReporter` costs per update: a ClipStep training step with and without `report()` after it.

One replica in this process (the default strategy: the one-replica-per-process regime of a GPU job), the MLP
of clipstep_overhead.py (512 -> HIDDEN x 2 -> 10), Adam. The reporter reads the step's state once per update
(one traced call, one small transfer) and writes nothing (no log_dir), so the difference is the read itself,
including the wait for the step it makes the host do. Both loops are timed in alternating blocks in this one
process.

    .venv/bin/python benchmarks/reporter_overhead.py [--rounds 20] [--steps 20] [--hidden 2048]
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402
from bench_common import alternate, arg_parser, build, data, report, strategy_step  # noqa: E402


def main() -> int:
    parser = arg_parser(__doc__, 64, "batch")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden units per layer (2048: 5.27M parameters)")
    args = parser.parse_args()
    strategy = tf.distribute.get_strategy()
    model, optimizer = build(0, hidden=args.hidden)
    clip = distclip.ClipStep(optimizer, clip_norm=args.clip_norm)
    clip.build(model.trainable_variables)
    reporter = distclip.ClipReporter(clip, model.trainable_variables)
    step = strategy_step(strategy, model, optimizer, clip, args.batch_size)
    x, y = (tf.constant(a) for a in data(args.batch_size))

    def reported():
        loss, norm = step(x, y)
        reporter.report(loss=loss)
        return loss, norm

    times, ratios, norms = alternate({"step": lambda: step(x, y), "step + report()": reported},
                                     args.rounds, args.steps)
    params = sum(int(tf.size(v)) for v in model.trainable_variables)
    report(" ".join([".venv/bin/python", "benchmarks/reporter_overhead.py"] + sys.argv[1:]),
           f"one replica (default strategy), MLP of {params / 1e6:.2f}M parameters, batch {args.batch_size}, "
           f"{args.rounds} rounds of {args.steps} steps", times, ratios, norms, args.clip_norm,
           "none (a figure for docs/benchmarks.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
