"""`AGC`: unit-wise adaptive gradient clipping (Brock et al., 2021) of the synchronized gradients.

A unit is a slice of a variable (optax's `unitwise_norm`): the whole variable
when it has at most one dimension of size above 1, a column (the last axis)
of a rank-2 or rank-3 variable, an output channel (the last axis) of a rank-4
convolution kernel. Each unit's gradient G_i is clipped against that unit's
weights W_i:

    G_i <- G_i * min(1, clipping * max(||W_i||, eps) / ||G_i||)

Pure functions of tensors: the gradients are the synchronized ones and the
weights are mirrored, so every replica computes the same factors and nothing
is communicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import tensorflow as tf

from distclip._src.checks import check_number
from distclip._src.errors import ArgumentError
from distclip._src.norm import Gradient, dedup_indexed_slices

#: Axes summed over for a unit's norm; None: the whole variable.
Axes = Optional[Tuple[int, ...]]
#: `||G_i||` below this divides as this (optax's `div_eps`): a zero gradient is never clipped anyway.
_DIV_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AGC:
    """Unit-wise adaptive gradient clipping (pass as `agc=` to `ClipStep` or `ClipOptimizer`).

    On the synchronized gradients, before the global clip, for each unit i
    (see `unit_axes`) of each variable:

        G_i <- G_i * min(1, clipping * max(||W_i||_2, eps) / ||G_i||_2)

    with G the gradient in the units of the global norm (the mean over
    replicas or micro-batches, unscaled by a loss scale, as it is clipped)
    and W the variable's value before the update. The global norm, the
    threshold and `clip_norm=` then apply to what is left: a unit's spike is
    cut back against its own weights without shrinking every other unit.
    With `clip_norm=None` AGC is the only clipping.

    Args:
      clipping: lambda, the largest ratio of a unit's gradient norm to its
        weight norm, > 0 (Brock et al. use 0.01 to 0.16, smaller for larger
        batches).
      eps: the smallest weight norm, > 0, so that zero-initialized weights
        (biases, a zero-initialized last layer) still move.

    Raises:
      ArgumentError: a value out of range, named.
    """

    clipping: float
    eps: float = 1e-3

    def __post_init__(self) -> None:
        check_number("clipping", self.clipping, 0.0)
        check_number("eps", self.eps, 0.0)


def unit_axes(variable: Any) -> Axes:
    """The axes `variable`'s unit norms sum over (optax's `unitwise_norm`).

    At most one dimension above 1 (after squeezing): the whole variable (None).
    Rank 2 or 3: axis 0 (a unit is a column: one output of a dense layer, or
    of each head). Rank 4: axes 0, 1, 2 (one output channel of an HWIO kernel).

    Args:
      variable: a variable (or anything with a fully known `shape` and a `name`).

    Returns:
      The axes, or None for the whole variable.

    Raises:
      ArgumentError: a variable of another rank, with its name and shape (optax refuses them too).
    """
    shape = tuple(variable.shape)
    if sum(1 for d in shape if d != 1) <= 1:
        return None
    if len(shape) in (2, 3):
        return (0,)
    if len(shape) == 4:
        return (0, 1, 2)
    raise ArgumentError(f"agc defines units for variables of rank 1 to 4 (as optax's unitwise_norm); got the "
                        f"variable {getattr(variable, 'path', None) or variable.name} of shape {shape}")


def unit_squares(x: Gradient, axes: Axes) -> tf.Tensor:
    """`||x_i||_2^2` per unit, float32, shaped to broadcast against `x` (a scalar for a whole-variable unit).

    A `tf.IndexedSlices` is measured as the dense gradient it stands for (repeated indices summed).
    """
    values = dedup_indexed_slices(x) if isinstance(x, tf.IndexedSlices) else tf.cast(x, tf.float32)
    if axes is None:
        return tf.reduce_sum(tf.square(values))
    return tf.reduce_sum(tf.square(values), axis=axes, keepdims=True)


def unit_factors(grad_squares: Sequence[tf.Tensor], weights: Sequence[Any], agc: AGC,
                 to_mean: Any) -> Tuple[List[tf.Tensor], List[tf.Tensor]]:
    """Each unit's factor, and each gradient's squared norm after it.

    `grad_squares` are `unit_squares` of the reduced sums; `to_mean` turns the
    sums into the gradients that are clipped (G = g * to_mean). Per unit, with
    u = ||g_i|| * to_mean and m = clipping * max(||W_i||, eps):

        a_i = 1 if u < m else m / max(u, 1e-6)

    Args:
      grad_squares: `unit_squares` of each reduced gradient (measured once, as the sums arrive).
      weights: their variables, in the same order (units as `unit_axes` defines them).
      agc: the clipping and eps.
      to_mean: scalar factor from the sums to G.

    Returns:
      (a per gradient, float32, broadcastable against it; `sum_i a_i^2 ||g_i||^2` per gradient, in the
      units of the sums). A non-finite unit gives a non-finite square (the step is then not finite).
    """
    factors, squares = [], []
    for g_squares, w in zip(grad_squares, weights, strict=True):
        ax = unit_axes(w)
        unit_norm = tf.sqrt(g_squares) * to_mean
        limit = agc.clipping * tf.maximum(tf.sqrt(unit_squares(tf.convert_to_tensor(w), ax)), agc.eps)
        factor = tf.where(unit_norm < limit, tf.ones_like(unit_norm), limit / tf.maximum(unit_norm, _DIV_EPS))
        factors.append(factor)
        squares.append(tf.reduce_sum(tf.square(factor) * g_squares))
    return factors, squares
