"""One process of a 2-replica run (Horovod, or MultiWorkerMirroredStrategy under mpirun): which replica and
variable made a step non-finite, the gradient noise scale on a problem with a closed-form answer, and a
rewind on a spike, and a skipped spike, against the run without the batches they discarded.

    diagnostics.py horovod|multiworker OUT_DIR

Writes OUT_DIR/rank{R}.json.
"""
import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distclip.cluster  # noqa: E402
import tensorflow as tf  # noqa: E402

mode, out_dir = sys.argv[1], sys.argv[2]
if mode == "horovod":
    import horovod.tensorflow as hvd

    hvd.init()
    strategy, rank = None, hvd.rank()
else:
    distclip.cluster.set_tf_config()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60.0))
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

import keras  # noqa: E402
import numpy as np  # noqa: E402

import distclip  # noqa: E402
from common import GLOBAL_BATCH, global_batch, lr_factor_by_hand, make_model, make_optimizer, \
    zero_moments_by_hand  # noqa: E402
from distclip._src.attribution import replica_places  # noqa: E402

REPLICAS = 2
def scope():
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def shard(array):
    per = array.shape[0] // REPLICAS
    if strategy is None:
        return tf.constant(array[rank * per:(rank + 1) * per])
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1) * per]))


def run(replica_fn, *args):
    if strategy is None:
        return replica_fn(*args)
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                 strategy.run(replica_fn, args=args))


def me():
    return rank if strategy is None else tf.distribute.get_replica_context().replica_id_in_sync_group


def local_loss(per_example, batch):
    """Horovod: the mean over this rank's shard (the backend averages); tf.distribute: the share of the global mean."""
    return tf.reduce_mean(per_example) if strategy is None else tf.reduce_sum(per_example) / batch


# 1. Attribution: replica `bad` adds `value` to one element of its gradient of variable `variable`.
with scope():
    model, optimizer = make_model(), make_optimizer("sgd")
    clip = distclip.ClipStep(optimizer, 1.0, variable_norms=True)
    optimizer.build(model.trainable_variables)
places = [list(p) for p in replica_places(model.variables)]


@tf.function
def poisoned_step(x, y, bad, variable, value):
    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            loss = local_loss(tf.square(model(x) - y), GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        for i, g in enumerate(grads):
            flat = tf.reshape(g, [-1])
            hit = tf.logical_and(tf.equal(me(), bad), tf.equal(variable, i))
            poison = tf.tensor_scatter_nd_update(tf.zeros_like(flat), [[0]], [value])
            grads[i] = tf.reshape(tf.where(hit, flat + poison, flat), g.shape)
        r = clip.apply(grads, model.trainable_variables)
        return r.finite, r.nonfinite_replicas, r.nonfinite_variables
    return run(replica_fn, x, y)


x, y = global_batch()
cases = []
for bad, variable, value in ((1, 2, np.inf), (0, 0, np.nan), (1, 3, -np.inf), (-1, 0, 0.0)):
    finite, replicas, variables = poisoned_step(shard(x), shard(y), tf.constant(bad), tf.constant(variable),
                                                tf.constant(value, tf.float32))
    state = [clip.nonfinite_replicas.numpy().tolist(), clip.nonfinite_variables.numpy().tolist()]
    cases.append({"bad": bad, "variable": variable, "finite": bool(finite),
                  "replicas": replicas.numpy().tolist(), "variables": variables.numpy().tolist(), "state": state})

# 2. The noise scale of linear regression with Gaussian inputs (tests/unit/test_diagnostics.py has the algebra).
D, S2, BATCH = 8, 1.0, 64
delta = np.full(D, 1.0 / np.sqrt(D), np.float32)
with scope():
    linear = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    sgd = keras.optimizers.SGD(0.0)
    noisy = distclip.ClipStep(sgd, None, noise_scale=distclip.NoiseScale(global_batch_size=BATCH, decay=0.99))
    sgd.build(linear.trainable_variables)


@tf.function
def noise_step(x, y):
    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            loss = local_loss(0.5 * tf.square(linear(x) - y), BATCH)
        return tuple(noisy.apply(tape.gradient(loss, linear.trainable_variables), linear.trainable_variables).noise)
    return run(replica_fn, x, y)


rng = np.random.default_rng(0)
for _ in range(300):
    xs = rng.normal(size=(BATCH, D)).astype(np.float32)
    ys = (xs @ -delta + rng.normal(size=BATCH) * np.sqrt(S2)).astype(np.float32)[:, None]
    noise = noise_step(shard(xs), shard(ys))


# 3. Rewind, or skip the spike: batch 9's targets are 100 times too large; the oracle never calls the step on
# the discarded batches.
def rewind_run(skip=(), before=None, **answer):
    """`before(i, optimizer)`: called before batch i (what the oracle of `lr_factor`/`reset_moments` does by hand)."""
    with scope():
        net, adam = make_model(), make_optimizer("adam")
        step = distclip.ClipStep(adam, 1.0, **answer)
        step.build(net.trainable_variables)

    @tf.function
    def train(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = local_loss(tf.square(net(x) - y), GLOBAL_BATCH)
            return step.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables, loss=loss).finite
        return run(replica_fn, x, y)

    for i in range(16):
        x, y = global_batch(i)
        if before is not None:
            before(i, adam)
        if i not in skip:
            train(shard(x), shard(y * 100.0 if i == 9 else y))
    return [np.array(v.numpy()) for v in net.trainable_variables + adam.variables], step


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


got, rewound = rewind_run(rewind=distclip.Rewind(every=3, keep=2, skip=2, factor=4.0, window=3))
event = rewound.latest_rewind()
want, _ = rewind_run(skip=set(range(event.to - 1, event.skip_through)))
skipping, skipper = rewind_run(skip_spikes=distclip.SkipSpikes(factor=4.0, zscore=None, window=3))
without_spike, _ = rewind_run(skip={9})
# After the rewind, the learning rate ramps up over 3 applied updates and Adam's moments start from zero: the
# oracle makes the same changes by hand, where the rewind went back and before each of the next 3 batches.
after, _ = rewind_run(rewind=distclip.Rewind(every=3, keep=2, skip=2, factor=4.0, window=3, lr_factor=0.25,
                                             lr_updates=3, reset_moments=True))
base = np.float32(make_optimizer("adam").learning_rate.numpy())


def by_hand(i, optimizer):
    if i == event.skip_through:
        zero_moments_by_hand(optimizer)
    if i >= event.skip_through:
        optimizer.learning_rate.assign(base * lr_factor_by_hand(0.25, 3, "linear", i - event.skip_through + 1))


after_by_hand, _ = rewind_run(skip=set(range(event.to - 1, event.skip_through)), before=by_hand)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"places": places, "cases": cases, "noise": [float(v) for v in noise],
               "skipped": int(clip.skipped_steps.numpy()), "rewind": list(event),
               "rewind_equals_oracle": same(got, want), "skipped_spikes": int(skipper.skipped_spikes.numpy()),
               "skip_equals_oracle": same(skipping, without_spike), "after_equals_oracle": same(after, after_by_hand),
               "rewound_weights": [v.ravel().tolist() for v in got]}, f)
