"""`ClipResult`: what one synchronized clip step computed."""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import tensorflow as tf


class ClipResult(NamedTuple):
    """What `sync_and_clip` (and `ClipStep.apply`) computed, usable inside `tf.function`.

    Fields:
      grads: the synchronized, clipped gradients, in the input order and length;
        `None` entries stay `None`, `tf.IndexedSlices` stay sparse.
      global_norm: float32 scalar, `sqrt(sum_i ||g_i||_2^2)` over the synchronized
        gradients before clipping (the L2 norm of all of them as one vector, in the
        gradients' own units). Identical on every replica.
      scale: float32 scalar actually multiplied into the gradients,
        `min(1, clip_norm / global_norm)`: at most 1. On a step skipped for a
        non-finite norm it is 0 (nothing is applied); with `nonfinite="propagate"`
        it is NaN, as in `tf.clip_by_global_norm`.
      clipped: bool scalar, `global_norm > clip_norm` on a finite step.
      finite: bool scalar, whether `global_norm` is finite.
    """

    grads: List[Optional[tf.Tensor]]
    global_norm: tf.Tensor
    scale: tf.Tensor
    clipped: tf.Tensor
    finite: tf.Tensor
