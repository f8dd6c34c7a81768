"""The norm and scale math: pure functions of tensors, no communication.

All of it accumulates in float32 whatever the gradients' float dtype, so a
float16 or bfloat16 gradient neither overflows when squared nor loses the sum.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import tensorflow as tf

Gradient = Union[tf.Tensor, tf.IndexedSlices]
#: The threshold `clip_norm=None` stands for: `min(1, inf / norm) == 1` for every finite norm, so the
#: step synchronizes and applies, never clips, and still reports the norm.
NO_CLIP = float("inf")
#: Name scope of the rare-path norm (gradients whose float32 sum of squares overflows).
RESCALED_NORM = "rescaled_norm"


def dedup_indexed_slices(grad: tf.IndexedSlices) -> tf.Tensor:
    """Rows of the dense gradient that `grad` stands for, one per distinct index.

    `tf.IndexedSlices` may repeat an index (an embedding row looked up twice, or
    the same row from two replicas after an all-gather); the dense gradient holds
    their sum. Sorting the indices and summing runs of equal ones keeps static
    shapes (at most as many rows as `grad.values`), so it compiles under XLA.
    Returns float32 values of shape `[n, ...]`, zero-padded past the distinct rows.
    """
    values = tf.cast(grad.values, tf.float32)
    indices = tf.reshape(grad.indices, [-1])
    order = tf.argsort(indices, stable=True)
    sorted_idx = tf.gather(indices, order)
    new_run = tf.concat([[0], tf.cast(sorted_idx[1:] != sorted_idx[:-1], tf.int32)], axis=0)
    segment = tf.cumsum(new_run)
    return tf.math.unsorted_segment_sum(tf.gather(values, order), segment, tf.size(indices))


def squared_norm(grad: Gradient) -> tf.Tensor:
    """`||g||_2^2` as a float32 scalar; for `tf.IndexedSlices`, that of the dense gradient."""
    if isinstance(grad, tf.IndexedSlices):
        return 2.0 * tf.nn.l2_loss(dedup_indexed_slices(grad))
    return 2.0 * tf.nn.l2_loss(tf.cast(grad, tf.float32))


def global_norm(grads: Sequence[Gradient]) -> tf.Tensor:
    """`sqrt(sum_i ||g_i||_2^2)`: the L2 norm of all gradients as one vector, float32.

    Same definition as `tf.linalg.global_norm`, except that repeated indices of
    `tf.IndexedSlices` are summed first, as in the dense gradient. When the sum
    of squares overflows float32 (finite gradients above about 1e19), the norm
    is computed again with every gradient divided by the largest magnitude m,

        global_norm = m * sqrt(sum_i ||g_i / m||_2^2)

    so it is finite whenever it fits in float32. That second pass runs only on
    such steps (a `tf.cond`); inf or NaN gradients still give a non-finite norm.
    """
    return norm_from_squares(sum_of_squares(grads), grads)


def sum_of_squares(grads: Sequence[Gradient]) -> tf.Tensor:
    """`sum_i ||g_i||_2^2`, float32 (one part of `global_norm`, e.g. one bucket's share)."""
    return tf.add_n([squared_norm(g) for g in grads])


def norm_from_squares(total: tf.Tensor, grads: Sequence[Gradient]) -> tf.Tensor:
    """`sqrt(total)` where `total` is the sum of squares of `grads`; if it overflowed, the rescaled second pass."""
    return tf.cond(tf.math.is_finite(total), lambda: tf.sqrt(total), lambda: _rescaled_norm(grads, total))


def _rescaled_norm(grads: Sequence[Gradient], total: tf.Tensor) -> tf.Tensor:
    with tf.name_scope(RESCALED_NORM):
        return _rescaled_norm_unscoped(grads, total)


def _rescaled_norm_unscoped(grads: Sequence[Gradient], total: tf.Tensor) -> tf.Tensor:
    values = [dedup_indexed_slices(g) if isinstance(g, tf.IndexedSlices) else tf.cast(g, tf.float32) for g in grads]
    largest = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(v)) for v in values]))
    usable = tf.logical_and(tf.math.is_finite(largest), largest > 0)
    safe = tf.where(usable, largest, 1.0)
    rescaled = safe * tf.sqrt(tf.add_n([2.0 * tf.nn.l2_loss(v / safe) for v in values]))
    return tf.where(usable, rescaled, tf.sqrt(total))


def clip_scale(norm: tf.Tensor, clip_norm: tf.Tensor) -> tf.Tensor:
    """`min(1, clip_norm / norm)`, float32; 1 for a zero norm, 0 for an infinite one."""
    return tf.minimum(tf.constant(1.0, tf.float32), clip_norm / norm)


def scale_gradient(grad: Gradient, scale: tf.Tensor, *, zero_on_zero_scale: bool = False) -> Gradient:
    """`grad * scale` in the gradient's dtype; `tf.IndexedSlices` stay sparse.

    With `zero_on_zero_scale`, a zero scale gives exact zeros even where the
    gradient holds inf or NaN (`tf.math.multiply_no_nan`), which is how a
    skipped step returns gradients that change nothing when applied.
    """
    mul = tf.math.multiply_no_nan if zero_on_zero_scale else tf.multiply
    if isinstance(grad, tf.IndexedSlices):
        values = mul(grad.values, tf.cast(scale, grad.values.dtype))
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    return mul(grad, tf.cast(scale, grad.dtype))


def scale_gradients(grads: Sequence[Gradient], scale: tf.Tensor, *, zero_on_zero_scale: bool = False,
                    factors: Optional[Sequence[tf.Tensor]] = None) -> List[Gradient]:
    """`[g * scale for g in grads]`, except that dense gradients skip the multiply when `scale == 1`.

    Most steps under a well-chosen threshold do not clip, and the multiply is a
    full read and write of every gradient: on those steps one `tf.cond` passes
    them through. (`tf.IndexedSlices` are always multiplied: they are small.)
    With `factors` (one per gradient, broadcastable against it: AGC's), every
    gradient is multiplied by `factor * scale`, in the same one multiply.
    """
    if factors is not None:
        return [scale_gradient(g, a * scale, zero_on_zero_scale=zero_on_zero_scale)
                for g, a in zip(grads, factors, strict=True)]
    out = [scale_gradient(g, scale, zero_on_zero_scale=zero_on_zero_scale) if isinstance(g, tf.IndexedSlices) else g
           for g in grads]
    dense = [i for i, g in enumerate(grads) if not isinstance(g, tf.IndexedSlices)]
    if dense:
        inputs = [grads[i] for i in dense]
        scaled = tf.cond(
            tf.not_equal(scale, 1.0),  # NaN (nonfinite="propagate") multiplies too
            lambda: [scale_gradient(g, scale, zero_on_zero_scale=zero_on_zero_scale) for g in inputs],
            lambda: [tf.identity(g) for g in inputs],
        )
        for i, g in zip(dense, scaled, strict=True):
            out[i] = g
    return out
