"""Code that must run once for all replicas, from inside the replica function.

`create_variables(create, reads)` makes variables once, wherever it is called
from (`strategy.run`, a traced step, or outside both), eagerly where it can.

`run_if(pred, true_fn, false_fn, args)` runs `true_fn(*args)` where `pred`
holds and `false_fn(*args)` where it does not; `run_switch(index, branches,
args)` runs `branches[index](*args)`. `pred` must be identical on
every replica (decided from synchronized gradients, or a step counter), so
every replica takes the same branch and collectives inside a branch match up
(the same holds for `index`).
Tensors a branch needs travel in `args`, so that each replica gets its own
(a closure over one replica's tensors would copy them to every device).

Under a tf.distribute strategy the optimizer's step cannot run inside a
`tf.cond` in the replica context: Keras's `iterations` variable has
ONLY_FIRST_REPLICA aggregation, and TensorFlow assigns such a variable from a
replica context through `merge_call` ("merge_call called while defining a new
graph"), also where the strategy otherwise needs no `merge_call`
(MirroredStrategy and MultiWorkerMirroredStrategy when the step is compiled
with XLA on GPUs). So under every strategy the condition is taken in the
cross-replica context, and each branch runs on every replica through
`call_for_each_replica`, as Keras's own `LossScaleOptimizer` does. Without a
strategy (one device, Horovod) it is a plain `tf.cond`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import tensorflow as tf

Branch = Callable[..., Any]


def run_if(pred: tf.Tensor, true_fn: Branch, false_fn: Branch, args: Sequence[Any] = ()) -> tf.Tensor:
    """Runs `true_fn(*args)` if `pred` else `false_fn(*args)`, on every replica; returns `pred` once done.

    Outputs of the branches are ignored: their stateful ops run all the same,
    since a branch of `tf.cond` in TF2 is a function graph with automatic
    control dependencies.
    """
    args = tuple(args)
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return tf.cond(pred, lambda: _returning(True, true_fn)(*args), lambda: _returning(False, false_fn)(*args))

    def merge_fn(strategy, pred, args):
        def on_every_replica(value, fn):
            def branch():
                strategy.extended.call_for_each_replica(_returning(value, fn), args=args)
                return tf.constant(value)
            return branch

        first = strategy.experimental_local_results(pred)[0]
        return tf.cond(first, on_every_replica(True, true_fn), on_every_replica(False, false_fn))

    return tf.distribute.get_replica_context().merge_call(merge_fn, args=(pred, args))


def run_switch(index: tf.Tensor, branches: Sequence[Branch], args: Sequence[Any] = ()) -> tf.Tensor:
    """Runs `branches[index](*args)` on every replica; `index` (int32) must be identical on every replica.
    Returns a tensor that is ready once the branch ran.

    `run_if` with more than two branches, in the same two contexts (a plain
    `tf.switch_case` without a strategy, the first replica's `index` in the
    cross-replica context under one).
    """
    args = tuple(args)
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return tf.switch_case(index, [_binding(fn, args) for fn in branches])

    def merge_fn(strategy, index, args):
        def on_every_replica(fn):
            def branch():
                strategy.extended.call_for_each_replica(_returning(True, fn), args=args)
                return tf.constant(True)
            return branch

        first = strategy.experimental_local_results(index)[0]
        return tf.switch_case(first, [on_every_replica(fn) for fn in branches])

    return tf.distribute.get_replica_context().merge_call(merge_fn, args=(index, args))


def _binding(fn: Branch, args: Tuple[Any, ...]) -> Callable[[], tf.Tensor]:
    return lambda: _returning(True, fn)(*args)


def _returning(value: bool, fn: Branch) -> Callable[..., tf.Tensor]:
    def branch(*args) -> tf.Tensor:
        fn(*args)
        return tf.constant(value)
    return branch


def create_variables(create: Callable[[], None], reads: Sequence[Any] = ()) -> None:
    """Runs `create()`, which makes variables (and may read `reads`), once, even when called inside `strategy.run`.

    Variables created inside a traced replica function fail under
    MirroredStrategy, so they are created in `tf.init_scope` (eagerly), and in a
    replica context of several replicas from the cross-replica context. The one
    exception: without a strategy, where a variable of `reads` was itself
    created in the step being traced (a model built lazily by its first call),
    its value exists only inside that step, so `create()` runs there, as Keras's
    own optimizers build (ScheduleFreeAdamW copies the weights when it builds).
    """
    def eagerly(*_):
        with tf.init_scope():
            create()

    ctx = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() and not _readable_eagerly(reads):
        create()
    elif tf.distribute.has_strategy() and ctx is not None and ctx.num_replicas_in_sync > 1:
        ctx.merge_call(eagerly)
    else:
        eagerly()


def _readable_eagerly(variables: Sequence[Any]) -> bool:
    """Whether every variable has a value outside the step being traced (none was created inside it)."""
    with tf.init_scope():
        return all(bool(tf.raw_ops.VarIsInitializedOp(resource=v.handle)) for v in variables
                   if getattr(v, "handle", None) is not None)
