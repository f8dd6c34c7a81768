"""What clipping costs as models and replica counts grow: ClipStep against the unclipped synchronized step.

Two regimes, reported side by side:
  * one replica per process, the regime that resembles one replica per accelerator:
    MultiWorkerMirroredStrategy with 2 and 4 workers of one CPU device each (`distclip.cluster.launcher`),
    and `horovodrun --gloo -np 2` and `-np 4` (against the step Horovod users write without clipping,
    `hvd.grouped_allreduce` of the gradients, averaged, then `optimizer.apply`), at 1M and 10M parameters;
  * MirroredStrategy over 2, 4 and 8 logical CPU devices of one process (one worker process per count,
    since the devices are fixed when TensorFlow starts), at 1M, 10M and 50M: every replica does its own norm
    pass and multiply, as on its own GPU, but here the replicas share the same 2 cores, so their passes add
    up and the ratio overstates the per-device cost.
Each times, alternating in blocks in the same process (A B, B A, ...), one training step with `ClipStep`
and the same step with plain `optimizer.apply` (one packed all-reduce of the gradients, Adam by default, the
same global batch, a threshold that binds on every step, so the multiply runs every step). Separately, on
one device, it times the norm pass alone (`distclip._src.norm.global_norm`) against a plain read of the same
gradients (`tf.reduce_sum` of each), to show where clipping's cost goes. Prints a table, and writes
docs/scaling.json (every timing; `benchmarks/cost_model.py` fits its constants to the MirroredStrategy rows)
and docs/scaling.png (the overhead ratio against parameters, one line per backend and replica count).

    .venv/bin/python benchmarks/scaling.py [--replicas 2 4 8] [--sizes 1M 10M 50M] [--rounds 10]
                                           [--multiworker 2 4] [--horovod 2 4] [--horovod-sizes 1M 10M]

Targets: median ratio ClipStep / unclipped at most 1.05 for one replica per process; the logical-CPU rows
are reported as they are; norm pass within 1.5x of the plain read.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
#: name -> (hidden width, hidden layers) of `bench_common.mlp`, 512 -> width x layers -> 10.
SIZES = {"1M": (768, 2), "10M": (2048, 3), "50M": (4096, 4)}
BATCH = 256
#: Steps per timed block, by size: fewer for the large models, whose steps take longer; at 1M, 30 steps
#: (blocks of 0.2 to 0.6 s) keep the timer and scheduling noise of one block small against the ratio.
BLOCK = {"1M": 30, "10M": 4, "50M": 2}
#: A worker (one replica count, every size) or a Horovod run that takes longer than this has stalled:
#: 20 rounds take at most about 4 minutes.
RUN_TIMEOUT_S = 1200


def worker(replicas: int, sizes: List[str], rounds: int, optimizer_name: str, multiworker: bool = False) -> List[dict]:
    """One replica count: every size, ClipStep against the unclipped step; on one device, the norm pass.

    With `multiworker`, this is one of `replicas` MultiWorkerMirroredStrategy workers (TF_CONFIG from
    distclip.cluster.launcher), one CPU device each: one replica per process. Every worker times in
    lockstep (both steps all-reduce); the chief returns the timings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from distclip.cluster.strategies import make_strategy

    # Before any other TensorFlow op.
    strategy = make_strategy("multiworker", collective_timeout_s=600.0) if multiworker else make_strategy(
        "mirrored", replicas=replicas)
    chief = not multiworker or json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0
    import keras
    import numpy as np
    import tensorflow as tf

    import distclip
    from bench_common import alternate, data, mlp, strategy_step
    from distclip._src.norm import global_norm

    rng = np.random.default_rng(0)
    xs, ys = data(BATCH)
    per = BATCH // replicas
    x = strategy.experimental_distribute_values_from_function(lambda c: tf.constant(xs[c.replica_id_in_sync_group * per:][:per]))
    y = strategy.experimental_distribute_values_from_function(lambda c: tf.constant(ys[c.replica_id_in_sync_group * per:][:per]))
    backend = "multiworker" if multiworker else "mirrored"
    results = []
    for size in sizes:
        steps = {}
        for name in ("unclipped", "ClipStep"):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                model = mlp(*SIZES[size])
                # A tiny step: the gradients (and so whether the threshold binds) stay the same from step to step.
                optimizer = keras.optimizers.Adam(1e-9) if optimizer_name == "adam" else keras.optimizers.SGD(1e-9)
                clip = distclip.ClipStep(optimizer, clip_norm=1e-3) if name == "ClipStep" else None
                optimizer.build(model.trainable_variables)

            steps[name] = strategy_step(strategy, model, optimizer, clip, BATCH)
        params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        norm = float(steps["ClipStep"](x, y)[1])
        # Each returns (the global loss to wait on, the norm); ratios are ClipStep / unclipped.
        times, ratios, _ = alternate({name: (lambda s=s: s(x, y)) for name, s in steps.items()}, rounds, BLOCK[size])

        result = {"backend": backend, "replicas": replicas, "size": size, "params": params, "global_norm": norm,
                  "clip_norm": 1e-3, "unclipped_s": times["unclipped"], "clipstep_s": times["ClipStep"], "ratios": ratios}
        if not multiworker:
            grads = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in model.trainable_variables]
            passes = {"plain read": tf.function(lambda g: tf.add_n([tf.reduce_sum(t) for t in g])),
                      "norm pass": tf.function(global_norm)}
            nan = tf.constant(float("nan"))
            pass_times, pass_ratios, _ = alternate({k: (lambda f=f: (f(grads), nan)) for k, f in passes.items()}, rounds, 10)
            result.update(plain_read_s=pass_times["plain read"], norm_pass_s=pass_times["norm pass"],
                          pass_ratios=pass_ratios)
        results.append(result)
        if chief:
            print(f"  {backend}, {replicas} replicas, {size} ({params / 1e6:.2f}M): ratio "
                  f"{statistics.median(ratios):.3f}", file=sys.stderr, flush=True)
    return results if chief else []


def horovod_worker(sizes: List[str], rounds: int, optimizer_name: str) -> List[dict]:
    """One rank of `horovodrun -np n`: ClipStep (its defaults: grouped all-reduce, 25 MB buckets) against the
    unclipped step users write (`hvd.grouped_allreduce` of the gradients, averaged, then `optimizer.apply`).
    Rank 0 returns the timings; every rank times in lockstep, since both steps all-reduce."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import horovod.tensorflow as hvd
    import keras
    import numpy as np
    import tensorflow as tf

    import distclip
    from bench_common import alternate, data, horovod_step, mlp

    hvd.init()
    ranks = hvd.size()
    x, y = (tf.constant(a) for a in data(BATCH // ranks, seed=hvd.rank()))  # the same global batch as MirroredStrategy's
    results = []
    for size in sizes:
        steps = {}
        for name in ("unclipped", "ClipStep"):
            keras.utils.set_random_seed(0)
            model = mlp(*SIZES[size])
            optimizer = keras.optimizers.Adam(1e-9) if optimizer_name == "adam" else keras.optimizers.SGD(1e-9)
            optimizer.build(model.trainable_variables)
            clip = distclip.ClipStep(optimizer, clip_norm=1e-3) if name == "ClipStep" else None
            steps[name] = horovod_step(model, optimizer, clip, x, y)
        params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        norm = float(steps["ClipStep"]()[1])
        times, ratios, _ = alternate(steps, rounds, BLOCK[size])
        results.append({"backend": "horovod", "replicas": ranks, "size": size, "params": params, "global_norm": norm,
                        "clip_norm": 1e-3, "unclipped_s": times["unclipped"], "clipstep_s": times["ClipStep"],
                        "ratios": ratios})
        if hvd.rank() == 0:
            print(f"  horovodrun -np {ranks}, {size}: ratio {statistics.median(ratios):.3f}", file=sys.stderr, flush=True)
    return results if hvd.rank() == 0 else []


def _summary(results: List[dict]) -> str:
    def spread(v):
        q = statistics.quantiles(v, n=4)
        return f"{statistics.median(v):.3f} ({q[0]:.3f}-{q[2]:.3f})"

    lines = [f"{'backend':>10} {'replicas':>8} {'size':>5} {'params':>8} {'unclipped ms':>13} {'ClipStep ms':>12} "
             f"{'ratio median (IQR)':>22} {'norm pass / read (IQR)':>24}"]
    for r in results:
        passes = spread(r["pass_ratios"]) if "pass_ratios" in r else "-"
        lines.append(f"{_backend(r):>10} {r['replicas']:>8} {r['size']:>5} {r['params'] / 1e6:>7.2f}M "
                     f"{statistics.median(r['unclipped_s']) * 1e3:>13.1f} {statistics.median(r['clipstep_s']) * 1e3:>12.1f} "
                     f"{spread(r['ratios']):>22} {passes:>24}")
    return "\n".join(lines)


def _backend(result: dict) -> str:
    return result.get("backend", "mirrored")


#: How each backend places its replicas: several logical CPU devices of one process, or one replica per process.
LABELS = {"mirrored": "MirroredStrategy (logical CPUs of one process)",
          "multiworker": "MultiWorkerMirroredStrategy (one replica per process)",
          "horovod": "horovodrun --gloo (one replica per process)"}


def _plot(results: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for backend, n in sorted({(_backend(r), r["replicas"]) for r in results}, key=lambda e: (e[0] != "mirrored", e[1])):
        rows = sorted((r for r in results if r["replicas"] == n and _backend(r) == backend), key=lambda r: r["params"])
        med = [statistics.median(r["ratios"]) for r in rows]
        q = [statistics.quantiles(r["ratios"], n=4) for r in rows]
        ax.errorbar([r["params"] for r in rows], med, yerr=[[m - a[0] for m, a in zip(med, q)], [a[2] - m for m, a in zip(med, q)]],
                    marker="o" if backend == "mirrored" else "s", ls=":" if backend == "mirrored" else "-", capsize=3,
                    label=f"{LABELS[backend].split(' (')[0]}, {n} replicas")
    ax.axhline(1.05, color="r", ls="--", lw=1, label="target 1.05")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time, ClipStep / unclipped")
    ax.set_title("Clipping's overhead, 2 cores: median, IQR. Solid: one replica per process; dotted: logical CPU "
                 "replicas sharing the cores", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _horovod_run(ranks: int, args) -> List[dict]:
    """`horovodrun --gloo -np ranks` of this script's Horovod worker, with a bound on its time."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        cmd = [horovodrun, "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}", sys.executable, __file__,
               "--horovod-worker", "--rounds", str(args.rounds), "--optimizer", args.optimizer,
               "--sizes", *args.horovod_sizes, "--out", out]
        _bounded(cmd, f"horovodrun -np {ranks}", RUN_TIMEOUT_S)
        with open(out) as f:
            return json.load(f)


def _multiworker_run(workers: int, args) -> List[dict]:
    """`distclip.cluster.launcher --nproc workers` of this script's MultiWorkerMirroredStrategy worker."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chief.json")
        cmd = [sys.executable, "-m", "distclip.cluster.launcher", "--nproc", str(workers), "--timeout",
               str(RUN_TIMEOUT_S), "--", sys.executable, __file__, "--multiworker-worker", str(workers), "--rounds",
               str(args.rounds), "--optimizer", args.optimizer, "--sizes", *args.horovod_sizes, "--out", out]
        _bounded(cmd, f"MultiWorkerMirroredStrategy with {workers} workers", RUN_TIMEOUT_S + 60)
        with open(out) as f:
            return json.load(f)


def _bounded(cmd: List[str], name: str, timeout_s: float) -> str:
    """Runs `cmd` in its own process group; returns its stdout. Past `timeout_s` the group gets SIGTERM, then
    SIGKILL 10 s later; a failure or a timeout ends the benchmark with the command's stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise SystemExit(f"{name} took more than {timeout_s:.0f} s and was stopped:\n{err[-3000:]}")
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{err[-3000:]}")
    sys.stderr.write(err[-2000:] if "ratio" not in err else "")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, nargs="*", default=[2, 4, 8], help="MirroredStrategy replica counts (none: skip)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--rounds", type=int, default=10, help="alternating block pairs per configuration")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="the update both steps end with (SGD: the lightest, so the largest ratio)")
    p.add_argument("--horovod", type=int, nargs="*", default=[2, 4], metavar="RANKS",
                   help="also time horovodrun --gloo with these rank counts (none: skip)")
    p.add_argument("--horovod-sizes", nargs="+", default=["1M", "10M"], choices=list(SIZES),
                   help="sizes for the Horovod and MultiWorkerMirroredStrategy runs (50M takes minutes per round there)")
    p.add_argument("--multiworker", type=int, nargs="*", default=[2, 4], metavar="WORKERS",
                   help="also time MultiWorkerMirroredStrategy with these worker counts, one CPU device each (none: skip)")
    p.add_argument("--multiworker-worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--horovod-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=DOCS, help="folder for scaling.json and scaling.png")
    args = p.parse_args(argv)
    if args.worker:
        json.dump(worker(args.worker, args.sizes, args.rounds, args.optimizer), sys.stdout)
        return 0
    if args.multiworker_worker:
        results = worker(args.multiworker_worker, args.sizes, args.rounds, args.optimizer, multiworker=True)
        if results:
            with open(args.out, "w") as f:
                json.dump(results, f)
        return 0
    if args.horovod_worker:
        results = horovod_worker(args.sizes, args.rounds, args.optimizer)
        if results:
            with open(args.out, "w") as f:
                json.dump(results, f)
        return 0
    command = " ".join([".venv/bin/python", "benchmarks/scaling.py"] + (argv if argv is not None else sys.argv[1:]))
    results = []
    for n in args.replicas:
        print(f"{n} replicas ...", file=sys.stderr, flush=True)
        out = _bounded([sys.executable, __file__, "--worker", str(n), "--rounds", str(args.rounds), "--optimizer",
                        args.optimizer, "--sizes", *args.sizes], f"the {n}-replica worker", RUN_TIMEOUT_S)
        results += json.loads(out)
    for n in args.multiworker:
        print(f"MultiWorkerMirroredStrategy, {n} workers ...", file=sys.stderr, flush=True)
        results += _multiworker_run(n, args)
    for n in args.horovod:
        print(f"horovodrun -np {n} ...", file=sys.stderr, flush=True)
        results += _horovod_run(n, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"command": command, "cpu_cores": os.cpu_count(), "batch": BATCH, "optimizer": args.optimizer,
                   "results": results}, f)
    _plot(results, os.path.join(args.out, "scaling.png"))
    print(f"command: {command}")
    print(f"setup: MirroredStrategy over N logical CPU devices of one process; one replica per process: "
          f"MultiWorkerMirroredStrategy with N workers of one CPU device and horovodrun --gloo -np N ({os.cpu_count()} cores), "
          f"MLP 512 -> width x layers -> 10, {args.optimizer}, global batch {BATCH}, clip_norm 1e-3 (binds on every "
          f"step), {args.rounds} alternating rounds")
    print(_summary(results))
    print("targets: ratio <= 1.05 for one replica per process (multiworker, horovod); logical-CPU rows as they are; "
          "norm pass / read <= 1.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
