"""Step time of ClipStep against the same step without clipping (plain optimizer.apply).

MirroredStrategy over 2 logical CPU devices, an MLP of about 5 million
parameters, Adam. Both steps are traced and warmed up, then timed in
alternating blocks (A B B A ...) in this one process, so machine noise hits
both alike. Prints the median per-block ratio ClipStep / plain with its spread.

    .venv/bin/python benchmarks/clipstep_overhead.py [--rounds 20] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from distclip.strategies import make_strategy  # noqa: E402

strategy = make_strategy("mirrored", replicas=2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import distclip  # noqa: E402

IN, HIDDEN, OUT = 512, 2048, 10


def build(seed: int):
    model = keras.Sequential([
        keras.Input((IN,)),
        keras.layers.Dense(HIDDEN, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed)),
        keras.layers.Dense(HIDDEN, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed + 1)),
        keras.layers.Dense(OUT, kernel_initializer=keras.initializers.GlorotUniform(seed + 2)),
    ])
    # A tiny learning rate keeps the gradients (and so whether the threshold
    # binds) the same from step to step; the update does the same work.
    optimizer = keras.optimizers.Adam(1e-7)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def make_step(model, optimizer, clip, global_batch):
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="alternating block pairs")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--clip-norm", type=float, default=0.1, help="threshold; the global norm here is about 2.3, so 0.1 binds on every step")
    p.add_argument("--nonfinite", default="skip", choices=["skip", "raise", "propagate"])
    args = p.parse_args()

    with strategy.scope():
        plain_model, plain_opt = build(0)
        clip_model, clip_opt = build(0)
        clip = distclip.ClipStep(clip_opt, clip_norm=args.clip_norm, nonfinite=args.nonfinite)
    params = sum(int(np.prod(v.shape)) for v in plain_model.trainable_variables)

    rng = np.random.default_rng(0)
    per = args.batch_size // strategy.num_replicas_in_sync
    xs = rng.normal(size=(args.batch_size, IN)).astype("float32")
    ys = rng.integers(0, OUT, size=(args.batch_size,)).astype("int32")
    x = strategy.experimental_distribute_values_from_function(lambda c: tf.constant(xs[c.replica_id_in_sync_group * per:][:per]))
    y = strategy.experimental_distribute_values_from_function(lambda c: tf.constant(ys[c.replica_id_in_sync_group * per:][:per]))

    steps = {"plain": make_step(plain_model, plain_opt, None, args.batch_size),
             "clipstep": make_step(clip_model, clip_opt, clip, args.batch_size)}

    norms = []

    def block(name):
        start = time.perf_counter()
        for _ in range(args.steps):
            out = steps[name](x, y)
        out[0].numpy()  # wait for the last step
        norms.append(float(out[1]))
        return (time.perf_counter() - start) / args.steps

    for name in steps:  # trace and warm up
        block(name)
        block(name)
    ratios, times = [], {"plain": [], "clipstep": []}
    for r in range(args.rounds):
        order = ("plain", "clipstep") if r % 2 == 0 else ("clipstep", "plain")
        t = {name: block(name) for name in order}
        for name in t:
            times[name].append(t[name])
        ratios.append(t["clipstep"] / t["plain"])

    q = statistics.quantiles(ratios, n=4)
    cmd = " ".join([".venv/bin/python", "benchmarks/clipstep_overhead.py"] + sys.argv[1:])
    print(f"command: {cmd}")
    print(f"setup: MirroredStrategy x{strategy.num_replicas_in_sync} (logical CPUs), MLP {params / 1e6:.2f}M params, "
          f"Adam, global batch {args.batch_size}, {args.rounds} alternating rounds of {args.steps} steps")
    print(f"plain optimizer.apply: median {statistics.median(times['plain']) * 1e3:.1f} ms/step")
    print(f"ClipStep:              median {statistics.median(times['clipstep']) * 1e3:.1f} ms/step")
    clip_norms = [n for n in norms if n == n]  # the ClipStep blocks
    print(f"global norm before clipping: min {min(clip_norms):.3g}, max {max(clip_norms):.3g} "
          f"(clip_norm {args.clip_norm}: {'binds' if min(clip_norms) > args.clip_norm else 'does not bind' if max(clip_norms) <= args.clip_norm else 'binds on some steps'})")
    print(f"ratio ClipStep/plain: median {statistics.median(ratios):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}); target <= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
