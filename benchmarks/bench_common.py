"""Shared by the benchmarks: the ~5M-parameter model, alternating timing, and the report."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import keras
import numpy as np

IN, HIDDEN, OUT = 512, 2048, 10


def mlp(hidden: int = HIDDEN, layers: int = 2, seed: int = 0):
    """The benchmarks' model: an MLP 512 -> hidden x layers -> 10 (ReLU), seeded Glorot-uniform kernels."""
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [keras.Input((IN,))]
        + [keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(seed + i)) for i in range(layers)]
        + [keras.layers.Dense(OUT, kernel_initializer=init(seed + layers))])


def build(seed: int = 0, hidden: int = HIDDEN, layers: int = 2):
    """`mlp` (by default of 5.27M parameters: 512 -> 2048 -> 2048 -> 10) and a built Adam.

    A tiny learning rate keeps the gradients (and so whether the threshold
    binds) the same from step to step; the update does the same work.
    """
    model = mlp(hidden, layers, seed)
    optimizer = keras.optimizers.Adam(1e-7)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def data(batch: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, IN)).astype("float32"), rng.integers(0, OUT, size=(batch,)).astype("int32")


def alternate(steps: Dict[str, Callable[[], Tuple]], rounds: int, block: int) -> Tuple[Dict[str, List[float]], List[float], List[float]]:
    """Times `block` steps of each entry in turn (A B, then B A, ...) after two warm-up blocks each.

    Each step returns (something to wait on, the pre-clip norm or NaN). Returns
    per-entry seconds per step, per-round ratios (second entry / first), and the norms seen.
    """
    names = list(steps)
    norms: List[float] = []

    def run(name):
        start = time.perf_counter()
        for _ in range(block):
            out = steps[name]()
        np.asarray(out[0])  # wait for the last step
        norms.append(float(np.asarray(out[1])))
        return (time.perf_counter() - start) / block

    for name in names:
        run(name)
        run(name)
    times: Dict[str, List[float]] = {n: [] for n in names}
    ratios = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(run(name))
        ratios.append(times[names[1]][-1] / times[names[0]][-1])
    return times, ratios, [n for n in norms if n == n]


def report(command: str, setup: str, times: Dict[str, List[float]], ratios: List[float], norms: List[float],
           clip_norm: float, target: str) -> None:
    q = statistics.quantiles(ratios, n=4)
    names = list(times)
    print(f"command: {command}")
    print(f"setup: {setup}")
    for name in names:
        print(f"{name:>28}: median {statistics.median(times[name]) * 1e3:.1f} ms/step")
    binds = "binds" if min(norms) > clip_norm else "does not bind" if max(norms) <= clip_norm else "binds on some steps"
    print(f"global norm before clipping: min {min(norms):.3g}, max {max(norms):.3g} (clip_norm {clip_norm}: {binds})")
    print(f"ratio {names[1]}/{names[0]}: median {statistics.median(ratios):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}); target {target}")
    sys.stdout.flush()


def arg_parser(doc: str, batch_default: int, batch_help: str) -> argparse.ArgumentParser:
    """The flags both benchmarks take."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="alternating block pairs")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)
    p.add_argument("--clip-norm", type=float, default=0.1,
                   help="threshold; the global norm here is about 2.3, so 0.1 binds on every step")
    p.add_argument("--nonfinite", default="skip", choices=["skip", "raise", "propagate"])
    return p


def horovod_report(script: str, model, args: argparse.Namespace, times: Dict[str, List[float]],
                   ratios: List[float], norms: List[float], target: str) -> None:
    """`report` on rank 0 of a Horovod benchmark: its command line and setup (ranks, `model`'s size, the flags)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    if hvd.rank() != 0:
        return
    params = sum(int(tf.size(v)) for v in model.trainable_variables)
    report(" ".join([".venv/bin/horovodrun", "--gloo", "-np", str(hvd.size()), "-H", f"localhost:{hvd.size()}",
                     ".venv/bin/python", f"benchmarks/{script}"] + sys.argv[1:]),
           f"Horovod x{hvd.size()}, MLP {params / 1e6:.2f}M params, Adam, batch {args.batch_size} per rank, "
           f"{args.rounds} alternating rounds of {args.steps} steps", times, ratios, norms, args.clip_norm, target)


def strategy_step(strategy, model, optimizer, clip, global_batch: int):
    """A traced training step under `strategy`: ClipStep's `apply` (or, with `clip=None`, the optimizer's own
    `apply`, which reduces the gradients itself). Returns step(x, y) -> (global loss, pre-clip norm or NaN)."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(loss_fn(y, model(x, training=True)), global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            if clip is None:
                optimizer.apply(grads, model.trainable_variables)
                return loss, tf.constant(float("nan"))
            return loss, clip.apply(grads, model.trainable_variables).global_norm

        loss, norm = strategy.run(replica_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None), strategy.experimental_local_results(norm)[0]

    return step


def horovod_step(model, optimizer, clip, x, y):
    """A traced training step on this Horovod rank's batch (x, y): ClipStep's `apply`, or, with `clip=None`, the
    step Horovod users write without clipping (`hvd.grouped_allreduce` of the gradients, averaged, then
    `optimizer.apply`). Returns step() -> (this rank's loss, pre-clip norm or NaN)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        if clip is None:
            optimizer.apply(hvd.grouped_allreduce(grads, op=hvd.Average), model.trainable_variables)
            return loss, tf.constant(float("nan"))
        return loss, clip.apply(grads, model.trainable_variables).global_norm

    return step
