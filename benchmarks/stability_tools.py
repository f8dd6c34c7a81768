"""Under Horovod, one replica per process: a ClipStep with one stability tool against the same ClipStep without it.

Same MLP of 5.27M parameters, Adam, clip_norm binding on every step; both
steps traced and warmed up, then timed in alternating blocks on every rank in
lockstep. Rank 0 prints the median per-round ratio (with the tool / without).

    .venv/bin/horovodrun --gloo -np 2 -H localhost:2 .venv/bin/python benchmarks/stability_tools.py --tool agc

Tools: agc (`AGC(0.01)` before the global clip), zclip (`ZClip(max_grad_norm=None)` as the threshold),
autoclip (`AutoClip()`), spikeclip (`SpikeClip()`), skip-spikes (`SkipSpikes()`, on the norm) and rewind (`Rewind(every=10**9)`: one
snapshot, taken while warming up; no spike).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import distclip  # noqa: E402
from bench_common import alternate, arg_parser, build, data, horovod_step, horovod_report  # noqa: E402

TOOLS = ("agc", "zclip", "autoclip", "spikeclip", "skip-spikes", "rewind", "groups")


def with_tool(tool: str, clip_norm: float) -> dict:
    """ClipStep's arguments for `tool`."""
    return {
        "agc": {"clip_norm": clip_norm, "agc": distclip.AGC(0.01)},
        "zclip": {"clip_norm": distclip.ZClip(max_grad_norm=None)},
        "autoclip": {"clip_norm": distclip.AutoClip()},
        "spikeclip": {"clip_norm": distclip.SpikeClip()},
        "skip-spikes": {"clip_norm": clip_norm, "skip_spikes": distclip.SkipSpikes()},
        "rewind": {"clip_norm": clip_norm, "rewind": distclip.Rewind(every=10 ** 9)},
        "groups": {"clip_norm": distclip.ClipGroups(
            [distclip.VariableGroup("kernels", clip_norm, patterns=[".*kernel"])], default=clip_norm,
            global_clip_norm=clip_norm)},
    }[tool]


def main() -> int:
    parser = arg_parser(__doc__, 128, "batch per rank")
    parser.add_argument("--tool", choices=TOOLS, required=True)
    args = parser.parse_args()
    hvd.init()

    x, y = (tf.constant(a) for a in data(args.batch_size, seed=hvd.rank()))
    plain_model, plain_opt = build(0)
    tool_model, tool_opt = build(0)
    plain = distclip.ClipStep(plain_opt, clip_norm=args.clip_norm, nonfinite=args.nonfinite)
    tool = distclip.ClipStep(tool_opt, nonfinite=args.nonfinite, **with_tool(args.tool, args.clip_norm))
    tool.build(tool_model.trainable_variables)

    steps = {"ClipStep": horovod_step(plain_model, plain_opt, plain, x, y),
             f"ClipStep + {args.tool}": horovod_step(tool_model, tool_opt, tool, x, y)}
    times, ratios, norms = alternate(steps, args.rounds, args.steps)
    horovod_report("stability_tools.py", plain_model, args, times, ratios, norms,
                   "none (measured for docs/benchmarks.md#stability-tools)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
