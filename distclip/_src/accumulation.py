"""Gradient accumulation: local sums over k micro-batches, one synchronized step on every k-th.

With `accumulation_steps=k`, each call adds this replica's gradients to its own
accumulators (no communication). On every k-th call the step runs once on the
mean of the k micro-batch gradients,

    g_i = (1/k) * sum_{j=1..k} g_i^(j)

(all-reduced, clipped and applied as usual), and the accumulators restart from
zero. The sums travel; the 1/k is folded into the clip multiply. With each micro-batch loss a
mean over its batch, this is one step on a k-times-larger batch.

The k-th call must run the collective and the update only then, identically on
every replica: `distclip._src.lockstep.run_if`.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import tensorflow as tf

from distclip._src.errors import ArgumentError
from distclip._src.internals import CheckedOnSave
from distclip._src.lockstep import create_variables, run_if


def _local_variable(name: str, shape, dtype) -> tf.Variable:
    """One copy per replica, read and written only by its own replica."""
    return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM if dtype.is_floating
                       else tf.VariableAggregation.ONLY_FIRST_REPLICA)


class Accumulation(CheckedOnSave):
    """Per-replica gradient sums and a micro-batch counter (saved by `tf.train.Checkpoint`)."""

    def __init__(self, steps: int, loss: bool = False, name: str = "accumulation"):
        super().__init__(name=name)
        self.steps = steps
        self.with_loss = loss  # also sum the losses (rewind reads them)
        self.loss_sum: Any = None
        self._strategy = tf.distribute.get_strategy()  # the owner is created under the strategy's scope
        self.micro_steps: Any = None  # a tf.Variable once created
        self.sums: List[Any] = []  # a tf.Variable per variable that receives gradients, else None

    def create(self, variables: Sequence[Any], present: Optional[Sequence[bool]] = None) -> None:
        """Creates the accumulators once (for the variables `present` marks), outside any traced function."""
        if self.micro_steps is not None:
            return
        present = [True] * len(variables) if present is None else list(present)
        create_variables(lambda: self._create(variables, present))

    def _create(self, variables, present) -> None:
        with self._strategy.scope(), self.name_scope:
            self.micro_steps = _local_variable("micro_steps", (), tf.int64)
            self.sums = [_local_variable(f"sum_{i}", v.shape, tf.as_dtype(v.dtype)) if p else None
                         for i, (v, p) in enumerate(zip(variables, present, strict=True))]
            if self.with_loss:
                self.loss_sum = _local_variable("sum_loss", (), tf.float32)

    def pending(self) -> int:
        """Micro-batches accumulated since the latest update (read eagerly; the same on every replica)."""
        if self.micro_steps is None:
            return 0
        return int(tf.convert_to_tensor(self.micro_steps.read_value()).numpy()) % self.steps

    def check_no_pending(self) -> None:
        """Raises ArgumentError when micro-batches are accumulated but not applied (read eagerly).

        A checkpoint between updates would hold this replica's partial sums only: restored on
        every replica (Horovod: rank 0's file) or merged across replicas (MirroredStrategy reads
        ON_READ sums as their total) they resume wrong. So it is refused, naming the way out.
        """
        if self.pending():
            raise ArgumentError(
                f"a checkpoint was taken between updates: {self.pending()} of accumulation_steps={self.steps} "
                "micro-batches are accumulated but not applied, and each replica holds its own partial sums. "
                "Save right after a call that applied, when pending_micro_batches is 0")

    def check_on_save(self) -> None:
        self.check_no_pending()

    def run(self, grads: Sequence[Optional[Any]], step_fn: Callable[..., Any],
            loss: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Adds `grads` (and `loss`) to this replica's sums; on every k-th call, `step_fn(sums, loss_sum)`
        then a reset (`loss_sum` is None without a `loss`).

        Returns a bool scalar: whether `step_fn` ran. Call it in the replica context.
        """
        if loss is not None and self.loss_sum is None:
            raise ArgumentError("loss with accumulation_steps > 1 is summed over micro-batches only for rewind; "
                                "pass rewind=distclip.Rewind(...) or leave loss out")
        totals = [None if g is None else s.assign_add(tf.cast(tf.convert_to_tensor(g), s.dtype), read_value=True)
                  for g, s in zip(grads, self.sums, strict=True)]
        total_loss = None if loss is None else self.loss_sum.assign_add(tf.cast(loss, tf.float32), read_value=True)
        count = self.micro_steps.assign_add(1, read_value=True)
        boundary = tf.equal(tf.math.floormod(count, self.steps), 0)

        def on_boundary(totals, total_loss):
            step_fn(totals, total_loss)
            for s in [*self.sums, self.loss_sum]:
                if s is not None:
                    s.assign(tf.zeros_like(s))

        return run_if(boundary, on_boundary, lambda *_: None, (totals, total_loss))
