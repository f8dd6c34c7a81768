"""A step whose synchronized global norm is inf or NaN: what each `nonfinite` choice does, decided here.

`finite = isfinite(global_norm)` is computed on the synchronized gradients, so
it is the same on every replica, and every replica makes the same choice:

  * "skip" (default): `scale = 0` and the gradients become exact zeros (a
    multiply that maps inf and NaN times 0 to 0). The update (`ClipStep`,
    `ClipOptimizer`) then runs on no replica: variables, optimizer slots and
    `iterations` stay as they were, `skipped_steps` grows by one, a policy's
    state does not move, and a loss scale halves.
  * "raise": the step fails with an error naming the norm, before anything is
    written (the assertion feeds `scale`, which every write depends on).
  * "propagate": `scale = NaN`, as `tf.clip_by_global_norm` gives: the update
    applies NaN gradients.

Where a step went non-finite is found at the cost of one pass over each
replica's own gradients and `n + 1` elements on the packed all-reduce (SUM
only, so it runs wherever the gradients' all-reduce runs, TPUStrategy
included): replica r sends `replica_report`, its flag at index r and its own
sum of squares at index n. Summed, the first n entries say which replicas'
gradients were non-finite, and the sum of squares feeds the gradient noise
scale (`distclip._src.noise`). Which variables comes from the synchronized
gradients themselves (`nonfinite_variables`). Both exact checks (`is_finite`
on every element) run only on a replica whose sum of squares is not finite:
a sum can overflow float32 with finite gradients (above about 1e19).
"""
from __future__ import annotations

from typing import Any, Literal, Sequence, Tuple, get_args

import tensorflow as tf

from distclip._src.norm import Gradient, sum_of_squares

Nonfinite = Literal["skip", "raise", "propagate"]
NONFINITE: Tuple[str, ...] = get_args(Nonfinite)


def skips(nonfinite: str) -> bool:
    """Whether a non-finite step is skipped: zero gradients, and no update on any replica."""
    return nonfinite == "skip"


def guarded_scale(nonfinite: str, scale: tf.Tensor, norm: tf.Tensor, finite: tf.Tensor) -> tf.Tensor:
    """The scale to multiply by: `scale` where the norm is finite; otherwise 0 (skip), NaN (propagate), or a
    failing assertion that the returned scale depends on (raise)."""
    if nonfinite == "raise":
        check = tf.debugging.Assert(finite, ["distclip: the global gradient norm is not finite: global_norm =", norm])
        with tf.control_dependencies([check]):
            return tf.identity(scale)
    fallback = 0.0 if skips(nonfinite) else float("nan")
    return tf.where(finite, scale, tf.fill([], fallback))


def has_nonfinite(grad: Gradient) -> tf.Tensor:
    """Whether any element of `grad` (its values, for `tf.IndexedSlices`) is inf or NaN: a bool scalar."""
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    return tf.logical_not(tf.reduce_all(tf.math.is_finite(values)))


def replica_report(grads: Sequence[Gradient], replica: Any, num_replicas: int, dtype: tf.DType) -> tf.Tensor:
    """What this replica adds to the packed all-reduce: `[num_replicas + 1]` of `dtype`.

    Entry `replica` is 1 if this replica's own `grads` hold an inf or a NaN;
    entry `num_replicas` is `sum_i ||g_i||_2^2` of them (float32 math). Summed
    over replicas: the flags of every replica, and the sum of their squares.
    """
    squares = sum_of_squares(grads) if grads else tf.zeros([], tf.float32)
    bad = tf.cond(tf.math.is_finite(squares), lambda: tf.constant(False),
                  lambda: tf.reduce_any(tf.stack([has_nonfinite(g) for g in grads])))
    flags = tf.one_hot(replica, num_replicas, dtype=tf.float32) * tf.cast(bad, tf.float32)
    return tf.cast(tf.concat([flags, squares[tf.newaxis]], axis=0), dtype)


def read_report(summed: tf.Tensor, num_replicas: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """The summed `replica_report`s: (bool `[num_replicas]`, which replicas were non-finite; the float32 sum of
    every replica's own sum of squares)."""
    summed = tf.cast(summed, tf.float32)
    return summed[:num_replicas] > 0.5, summed[num_replicas]


def nonfinite_variables(grads: Sequence[Gradient], total: tf.Tensor) -> tf.Tensor:
    """bool `[len(grads)]`: which of `grads` hold an inf or a NaN, checked only when `total`, their sum of
    squares, is not finite (all False otherwise)."""
    if not grads:
        return tf.zeros([0], tf.bool)
    return tf.cond(tf.math.is_finite(total), lambda: tf.zeros([len(grads)], tf.bool),
                   lambda: tf.stack([has_nonfinite(g) for g in grads]))
