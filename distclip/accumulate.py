"""Gradient accumulation: local sums over k micro-batches, one synchronized step on every k-th.

With `accumulation_steps=k`, each call adds this replica's gradients to its own
accumulators (no communication). On every k-th call the step runs once on the
mean of the k micro-batch gradients,

    g_i = (1/k) * sum_{j=1..k} g_i^(j)

(all-reduced, clipped and applied as usual), and the accumulators restart from
zero. The sums travel; the 1/k is folded into the clip multiply. With each micro-batch loss a
mean over its batch, this is one step on a k-times-larger batch.

The k-th call must run the collective and the update only then, identically on
every replica. MirroredStrategy allows neither a collective nor a `merge_call`
inside a `tf.cond` in the replica context, so there the condition is taken in
the cross-replica context around `call_for_each_replica` (as Keras's
LossScaleOptimizer does); elsewhere (Horovod, a single replica,
MultiWorkerMirroredStrategy, which needs no merge_call) it is a plain `tf.cond`.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, List, Optional, Sequence

import tensorflow as tf

from distclip.errors import ArgumentError


def check_steps(accumulation_steps: Any) -> int:
    if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral)
            or accumulation_steps < 1):
        raise ArgumentError(f"accumulation_steps must be an integer >= 1; got accumulation_steps={accumulation_steps!r}")
    return int(accumulation_steps)


def _local_variable(name: str, shape, dtype) -> tf.Variable:
    """One copy per replica, read and written only by its own replica."""
    return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM if dtype.is_floating
                       else tf.VariableAggregation.ONLY_FIRST_REPLICA)


class Accumulation(tf.Module):
    """Per-replica gradient sums and a micro-batch counter (saved by `tf.train.Checkpoint`)."""

    def __init__(self, steps: int, name: str = "accumulation"):
        super().__init__(name=name)
        self.steps = check_steps(steps)
        self._strategy = tf.distribute.get_strategy()  # the owner is created under the strategy's scope
        self.micro_steps: Optional[tf.Variable] = None
        self.sums: List[Optional[tf.Variable]] = []

    def build(self, variables: Sequence[Any], present: Optional[Sequence[bool]] = None) -> None:
        """Creates the accumulators once (for the variables `present` marks), outside any traced function."""
        if self.micro_steps is not None:
            return
        present = [True] * len(variables) if present is None else list(present)
        ctx = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and ctx is not None and ctx.num_replicas_in_sync > 1:
            # Called first from inside the step: variables are created from the cross-replica context.
            ctx.merge_call(lambda _: self._create(variables, present))
        else:
            self._create(variables, present)

    def _create(self, variables, present) -> None:
        with tf.init_scope(), self._strategy.scope(), self.name_scope:
            self.micro_steps = _local_variable("micro_steps", (), tf.int64)
            self.sums = [_local_variable(f"sum_{i}", v.shape, tf.as_dtype(v.dtype)) if p else None
                         for i, (v, p) in enumerate(zip(variables, present))]

    def run(self, grads: Sequence[Optional[Any]], step_fn: Callable[[List[Optional[tf.Tensor]]], Any]) -> tf.Tensor:
        """Adds `grads` to this replica's sums; on every k-th call, `step_fn(sums)` then a reset.

        Returns a bool scalar: whether `step_fn` ran. Call it in the replica context.
        """
        totals = [None if g is None else s.assign_add(tf.cast(tf.convert_to_tensor(g), s.dtype), read_value=True)
                  for g, s in zip(grads, self.sums)]
        count = self.micro_steps.assign_add(1, read_value=True)
        boundary = tf.equal(tf.math.floormod(count, self.steps), 0)

        def on_boundary(totals):
            done = step_fn(totals)
            with tf.control_dependencies(tf.nest.flatten(done)):
                resets = [s.assign(tf.zeros_like(s)) for s in self.sums if s is not None]
            with tf.control_dependencies(resets):
                return tf.constant(True)

        return _run_if(boundary, on_boundary, totals)


def _run_if(pred: tf.Tensor, fn: Callable[[List[Optional[tf.Tensor]]], tf.Tensor], args: List) -> tf.Tensor:
    """`fn(args)` where `pred` (identical on every replica) holds, from the replica context."""
    if not tf.distribute.has_strategy() or tf.__internal__.distribute.strategy_supports_no_merge_call():
        return tf.cond(pred, lambda: fn(args), lambda: tf.constant(False))

    def merge_fn(strategy, pred, args):
        def branch():
            out = strategy.extended.call_for_each_replica(fn, args=(args,))
            with tf.control_dependencies(strategy.experimental_local_results(out)):
                return tf.constant(True)

        return tf.cond(strategy.experimental_local_results(pred)[0], branch, lambda: tf.constant(False))

    return tf.distribute.get_replica_context().merge_call(merge_fn, args=(pred, args))
