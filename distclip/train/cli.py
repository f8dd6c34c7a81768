"""The `distclip` command (also `python -m distclip`)."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from typing import List, Optional, Tuple, Union

from distclip.cluster import STRATEGIES
from distclip.train.config import POLICIES, Config


def _clip_norm(text: str) -> Union[float, str, None]:
    if text.lower() == "none":
        return None
    if text.lower() in POLICIES:
        return text.lower()
    choices = f"a positive finite number, 'none' or a policy ({', '.join(POLICIES)})"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip-norm must be {choices}; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--clip-norm must be {choices}; got {text!r}")
    return value


#: The largest step number, count or period a flag takes (the step counters are int64; 2**62 leaves headroom).
LARGEST = 2 ** 62


def _int_in(low: int, high: int):
    """An argparse type: an integer in [low, high], else a usage error naming the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}; got {text!r}")
        return value
    return parse


def _steps(text: str) -> Tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        steps = (-1,)
    if any(not 0 <= s <= LARGEST for s in steps):
        raise argparse.ArgumentTypeError(f"expected step numbers from 0 to {LARGEST} separated by commas, got {text!r}")
    return steps


def _rewind(text: str) -> Tuple[int, ...]:
    """EVERY,KEEP,SKIP as three integers; their ranges are `distclip.Rewind`'s, checked in `main`."""
    try:
        every, keep, skip = (int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rewind must be EVERY,KEEP,SKIP (three integers); got {text!r}") from None
    return every, keep, skip


def _number_and_integer(flag: str, names: str):
    """An argparse type: NUMBER,INTEGER (such as ZSCORE,WINDOW); their ranges are the library's, checked in
    `_check`."""
    def parse(text: str) -> Tuple[float, ...]:
        try:
            number, integer = text.split(",")
            return float(number), int(integer)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {names} (a number and an integer); "
                                             f"got {text!r}") from None
    return parse


def _clip_group(text: str) -> Tuple[str, float]:
    """PATTERN=THRESHOLD as a string and a number; `distclip.VariableGroup` checks both, in `_check`."""
    pattern, _, threshold = text.rpartition("=")
    try:
        value = float(threshold)
    except ValueError:
        pattern = ""
    if not pattern:
        raise argparse.ArgumentTypeError(f"--clip-group must be PATTERN=THRESHOLD (a regular expression matching "
                                         f"whole variable paths, a positive finite number); got {text!r}")
    return pattern, value


def _number_above(flag: str, low: float, what: str = ""):
    """An argparse type: a finite number above `low`, else a usage error naming the flag and the value."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > low):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number > {low:g}{what}; got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="distclip",
                                description="Synchronized global-norm gradient clipping for TensorFlow.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train the example RNN on the adding problem with ClipStep",
        description="Trains a vanilla RNN on the adding problem (Hochreiter & Schmidhuber; Pascanu et al. 2013), "
        "whose gradients explode, with distclip.ClipStep, and writes metrics.csv, TensorBoard events, "
        "plot.png and summary.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--strategy", choices=STRATEGIES + ("horovod",), default=d.strategy,
                   help="auto: multiworker if TF_CONFIG names several workers, else mirrored; "
                   "horovod: one replica per process, launched with horovodrun, mpirun or srun")
    t.add_argument("--replicas", type=_int_in(1, 4096), default=d.replicas,
                   help="replicas for --strategy mirrored (GPUs, or logical CPU devices)")
    t.add_argument("--clip-norm", type=_clip_norm, default=d.clip_norm,
                   help="global-norm threshold; 'none' to train without clipping; or a threshold policy with its "
                        "defaults: autoclip (distclip.AutoClip), spikeclip (distclip.SpikeClip), zclip "
                        "(distclip.ZClip, which caps at 1.0)")
    t.add_argument("--steps", type=_int_in(1, LARGEST), default=d.steps)
    t.add_argument("--batch-size", type=_int_in(1, 2 ** 20), default=d.batch_size,
                   help="global batch size, split over the replicas")
    t.add_argument("--length", type=_int_in(2, 2 ** 16), default=d.length, help="sequence length of the adding problem")
    t.add_argument("--units", type=_int_in(1, 2 ** 14), default=d.units, help="RNN hidden units")
    t.add_argument("--recurrent-gain", type=float, default=d.recurrent_gain,
                   help="gain of the orthogonal recurrent initializer")
    t.add_argument("--learning-rate", type=float, default=d.learning_rate, help="SGD learning rate (momentum 0.9)")
    t.add_argument("--seed", type=_int_in(0, 2 ** 63 - 1), default=d.seed)
    t.add_argument("--out", default=d.out, help="output directory")
    t.add_argument("--checkpoint-every", type=_int_in(0, LARGEST), default=d.checkpoint_every, metavar="N",
                   help="write OUT/checkpoints every N steps (0: only at the end and on SIGTERM); on SIGTERM the run "
                   "checkpoints after the current step on every rank and exits with status 143")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints (start at step 0 if there is none)")
    t.add_argument("--move-aside", action="store_true",
                   help="a new run (without --resume) into an OUT that holds an earlier run's outputs moves them into "
                        "OUT/aside-N/ (nothing is deleted); without it, such a run is refused")
    t.add_argument("--fit", action="store_true",
                   help="train with model.fit and distclip.keras.ClipOptimizer (+ ClipLogger) "
                        "instead of the custom loop")
    t.add_argument("--variable-norms-every", type=_int_in(0, LARGEST), default=d.variable_norms_every, metavar="N",
                   help="write per-layer gradient norms to OUT/layer_norms.csv and TensorBoard every N steps "
                        "(0: never); distclip plot then draws the largest")
    t.add_argument("--noise-scale", action="store_true",
                   help="estimate the gradient noise scale B_simple (McCandlish et al. 2018) from the replicas' "
                        "gradients; needs 2 or more replicas")
    t.add_argument("--nan-at", type=_steps, default=d.nan_at, metavar="STEP[,STEP...]",
                   help="put a NaN into the last replica's batch at these steps, to see a non-finite step named")
    t.add_argument("--rewind", type=_rewind, default=d.rewind, metavar="EVERY,KEEP,SKIP",
                   help="on a spike of the norm or the loss, every replica goes back to the oldest of KEEP in-memory "
                        "snapshots taken every EVERY steps and skips the next SKIP steps (distclip.Rewind)")
    t.add_argument("--rewind-factor", type=_number_above("--rewind-factor", 1), default=None, metavar="F",
                   help=f"with --rewind: a spike is a norm or loss above F times its mean over the window "
                        f"(with --rewind, None means {d.rewind_factor:g})")
    t.add_argument("--rewind-window", type=_int_in(2, 2 ** 20), default=None, metavar="N",
                   help="with --rewind: the last N applied steps the mean is taken over (no spike before N steps; "
                        f"with --rewind, None means {d.rewind_window})")
    t.add_argument("--rewind-lr", type=_number_and_integer("--rewind-lr", "FACTOR,UPDATES"), default=d.rewind_lr,
                   metavar="FACTOR,UPDATES",
                   help="with --rewind: the next UPDATES applied updates after a rewind run at the learning rate "
                        "times a factor ramped linearly from FACTOR back to 1 (distclip.Rewind lr_factor, "
                        "lr_updates)")
    t.add_argument("--rewind-reset-moments", action="store_true",
                   help="with --rewind: SGD's momentum is set to zero after a rewind (distclip.Rewind "
                        "reset_moments)")
    t.add_argument("--skip-spikes", type=_number_and_integer("--skip-spikes", "ZSCORE,WINDOW"),
                   default=d.skip_spikes, metavar="ZSCORE,WINDOW",
                   help="skip, on every replica together, a step whose norm or loss is more than ZSCORE standard "
                        "deviations from its mean over the last WINDOW steps (skipped spikes included), either way "
                        "(OLMo-core's rule; distclip.SkipSpikes); nothing goes back. Not with --rewind")
    t.add_argument("--agc", type=_number_above("--agc", 0, " (AGC's clipping)"), default=d.agc, metavar="LAMBDA",
                   help="clip each unit's gradient to LAMBDA times its weight's norm (distclip.AGC, Brock et al. "
                        "2021), before the --clip-norm clip. Not with --noise-scale")
    t.add_argument("--clip-group", type=_clip_group, action="append", default=None, metavar="PATTERN=THRESHOLD",
                   help="clip the variables whose whole path matches PATTERN (a regular expression; the model's "
                        "are adding_rnn/simple_rnn/simple_rnn_cell/{kernel,recurrent_kernel,bias} and "
                        "adding_rnn/dense/{kernel,bias}) by their own norm at THRESHOLD (distclip.ClipGroups); "
                        "repeat for more groups. --clip-norm is then the threshold of the rest")
    t.add_argument("--spike-at", type=_steps, default=d.spike_at, metavar="STEP[,STEP...]",
                   help="multiply the targets of these steps' batches by 100, to see a spike (and a rewind or a skip)")
    pl = sub.add_parser(
        "plot",
        help="draw a run's metrics.csv (from distclip train or distclip.keras.ClipLogger) as a PNG",
        description="Reads RUN_DIR/metrics.csv and draws the global norm before clipping against the threshold, "
        "and the loss, over steps.",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a directory holding metrics.csv")
    pl.add_argument("--out", help="PNG to write (default: RUN_DIR/plot.png)")
    pl.add_argument("--title", help="plot title (default: RUN_DIR)")
    return p


def _plot(args: argparse.Namespace) -> int:
    from distclip.train.plots import plot, read_csv, read_layers, read_rewinds

    path = os.path.join(args.run_dir, "metrics.csv")
    if not os.path.isfile(path):
        print(f"distclip plot: no metrics.csv in {args.run_dir!r}", file=sys.stderr)
        return 2
    rows = read_csv(path)
    if not rows:
        print(f"distclip plot: {path} has no rows", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "plot.png")
    plot(rows, out, args.title or os.path.abspath(args.run_dir), layers=read_layers(args.run_dir),
         rewinds=read_rewinds(args.run_dir))
    print(f"distclip plot: {len(rows)} steps -> {out}")
    return 0


def _require(modules: List[str], command: str) -> None:
    """Exits with what to install when the packages a command needs (beyond TensorFlow) are missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"distclip {command} needs {' and '.join(missing)}: pip install 'distclip[train]'")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The settings, with every flag that would be ignored or out of range refused as a usage error."""
    d = Config()
    if not args.rewind:
        given = [f for f, v in (("--rewind-factor", args.rewind_factor), ("--rewind-window", args.rewind_window))
                 if v is not None]
        if given:
            p.error(f"{' and '.join(given)} set how --rewind detects a spike; without --rewind nothing would use them")
        given = [f for f, v in (("--rewind-lr", args.rewind_lr), ("--rewind-reset-moments", args.rewind_reset_moments))
                 if v]
        if given:
            p.error(f"{' and '.join(given)} set what follows a rewind; without --rewind nothing would use them")
    args.rewind_factor = d.rewind_factor if args.rewind_factor is None else args.rewind_factor
    args.rewind_window = d.rewind_window if args.rewind_window is None else args.rewind_window
    for name in ("nan_at", "spike_at"):
        beyond = [s for s in getattr(args, name) if s >= args.steps]
        if beyond:
            p.error(f"--{name.replace('_', '-')} {','.join(map(str, beyond))}: beyond --steps {args.steps} "
                    f"(steps are numbered 0 to {args.steps - 1}), so it would never happen")
    if args.rewind and args.skip_spikes:
        p.error("--rewind and --skip-spikes are two answers to one spike detector; pass one")
    if args.agc is not None and args.noise_scale:
        p.error("--agc changes each replica's gradient unit by unit, and --noise-scale compares the replicas' "
                "gradients with their mean; pass one")
    args.clip_group = tuple(args.clip_group or ())
    if args.clip_group and isinstance(args.clip_norm, str):
        p.error(f"--clip-group with --clip-norm {args.clip_norm}: with groups, --clip-norm is the threshold of the "
                "variables no group claims, a number or none")
    if args.clip_group and args.noise_scale:
        p.error("--clip-group scales each group's gradients on its own, and --noise-scale compares the replicas' "
                "gradients with their mean; pass one")
    if args.move_aside and args.resume:
        p.error("--move-aside moves an earlier run's outputs away for a new run; --resume continues that run")
    cfg = Config(**{k: v for k, v in vars(args).items() if k != "command"})
    if cfg.rewind:
        from distclip import ArgumentError

        try:
            cfg.rewind_config()
        except ArgumentError as e:
            lr = f", --rewind-lr {cfg.rewind_lr[0]:g},{cfg.rewind_lr[1]}" if cfg.rewind_lr else ""
            p.error(f"--rewind {','.join(map(str, cfg.rewind))} (with --rewind-factor {cfg.rewind_factor:g}, "
                    f"--rewind-window {cfg.rewind_window}{lr}): {e}")
    if cfg.clip_group:
        from distclip import ArgumentError

        try:
            cfg.threshold()
        except ArgumentError as e:
            p.error(f"--clip-group {' --clip-group '.join(f'{g}={c:g}' for g, c in cfg.clip_group)}: {e}")
    if cfg.skip_spikes:
        from distclip import ArgumentError

        try:
            cfg.skip_spikes_config()
        except ArgumentError as e:
            p.error(f"--skip-spikes {cfg.skip_spikes[0]:g},{cfg.skip_spikes[1]}: {e}")
    return cfg


def _hold_output_folder(cfg: Config, runner) -> Optional[object]:
    """The chief takes OUT (`distclip.train.outdir`) before anything is written; every rank learns whether it
    could (one collective), and all exit together if not. Returns the held folder (chief) or None."""
    from distclip.train.outdir import OutputFolder, OutputFolderError

    folder, refused = None, ""
    if runner.chief:
        folder = OutputFolder(cfg.out)
        try:
            folder.acquire()
            aside = None if cfg.resume else folder.check_new_run(cfg.move_aside)
            if aside:
                print(f"distclip train: moved the earlier run's outputs into {aside}", file=sys.stderr, flush=True)
        except OutputFolderError as e:
            folder.release()
            refused = str(e)
    _, any_refused = runner.agree(0.0, bool(refused))
    if any_refused:
        raise SystemExit(f"distclip train: {refused}" if refused else
                         "distclip train: rank 0 refused the output folder (its message says why)")
    return folder


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "plot":
        _require(["matplotlib"], "plot")
        return _plot(args)
    _require(["matplotlib", "tensorboard"], "train")
    cfg = _check(p, args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The strategy must be created before anything else touches TensorFlow.
    from distclip.train.runners import make_runner

    runner = make_runner(cfg.strategy, cfg.replicas)
    if cfg.batch_size % runner.replicas:
        p.error(f"--batch-size {cfg.batch_size} must be divisible by the {runner.replicas} replicas")
    if cfg.noise_scale and runner.replicas < 2:
        p.error(f"--noise-scale needs 2 or more replicas (each replica's gradient is one small batch); this run has "
                f"{runner.replicas}")
    held = _hold_output_folder(cfg, runner)  # noqa: F841 (held until the process ends)
    if cfg.fit:
        from distclip.train.fit import run
    else:
        from distclip.train.loop import run
    from distclip import RewindLimitError

    try:
        summary = run(cfg, runner)
    except RewindLimitError as e:
        print(f"\ndistclip train: {e}", file=sys.stderr, flush=True)
        return 3
    print(
        f"\ndistclip train: {summary['strategy']} x{summary['replicas']}, clip_norm={cfg.clip_norm}, "
        + "".join(f"{pattern}={threshold:g}, " for pattern, threshold in cfg.clip_group)
        + ("" if cfg.agc is None else f"AGC {cfg.agc:g}, ") + f"{cfg.steps} steps\n"
        f"  final loss (mean training MSE, last 100 steps): {summary['final_loss']:.4g}\n"
        f"  held-out MSE (1024 sequences):                  {summary['eval_mse']:.4g}\n"
        f"  steps clipped: {summary['steps_clipped']}   steps skipped (non-finite norm): {summary['steps_skipped']}\n"
        + (f"  steps not learned from after a spike (rewound or skipped): {summary['steps_skipped_by_rewind']}\n"
           if cfg.rewind else "")
        + (f"  spikes skipped (--skip-spikes): {summary['spikes_skipped']}\n" if cfg.skip_spikes else "") +
        f"  replicas identical: {summary['variables_verified_identical']} variables checked (verify_replicas)\n"
        + "".join(f"  {s['line']}\n" for s in summary["nonfinite_steps"][:10])
        + (f"  ... {len(summary['nonfinite_steps']) - 10} more in nonfinite.csv\n"
           if len(summary["nonfinite_steps"]) > 10 else "")
        + "".join(f"  {r['line']}\n" for r in summary["rewinds"])
        + ("" if summary.get("b_simple") is None else f"  gradient noise scale B_simple: {summary['b_simple']:.4g}\n") +
        (f"  outputs: {os.path.abspath(cfg.out)}/{{metrics.csv, tensorboard/, plot.png, summary.json}}"
         if runner.chief else "  outputs: written by rank 0"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
