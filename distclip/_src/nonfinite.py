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
"""
from __future__ import annotations

from typing import Literal, Tuple, get_args

import tensorflow as tf

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
