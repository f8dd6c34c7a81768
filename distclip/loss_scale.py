"""Mixed precision: a Keras `LossScaleOptimizer` as distclip runs it.

distclip supports one order, `LossScaleOptimizer(inner)` given to `ClipStep`
or `ClipOptimizer`. The loss is multiplied by the dynamic scale S, so the
synchronized gradients are S times the true ones. The step then uses

    global_norm = ||sum_r g_r||_2 / S        (the unscaled norm)
    g          <- g * scale / S              (unscale and clip in one multiply)

and decides overflow on that synchronized norm, so every replica agrees. The
inner optimizer's own `apply` takes the step; S moves as Keras's
`LossScaleOptimizer` moves it: halved after a non-finite step (the counter
restarts), doubled after `dynamic_growth_steps` finite steps in a row.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf


class Split(NamedTuple):
    """The optimizer that takes the steps, and the LossScaleOptimizer around it (or None)."""

    stepper: Any
    lso: Optional[Any]


def split(optimizer: Any) -> Split:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return Split(optimizer.inner_optimizer, optimizer)
    return Split(optimizer, None)


def scale_of(lso: Optional[Any]) -> Optional[tf.Tensor]:
    """The current dynamic scale S as a float32 tensor, or None without loss scaling."""
    return None if lso is None else tf.cast(tf.convert_to_tensor(lso.dynamic_scale.value), tf.float32)


def next_state(lso: Any, finite: tf.Tensor) -> List[Tuple[Any, tf.Tensor]]:
    """(variable, value) pairs for the scale and its counter after a step; `finite` is identical everywhere.

    Finite: the counter grows, and after `dynamic_growth_steps` finite steps in a
    row the scale doubles; not finite: the scale halves and the counter restarts.
    """
    counter = tf.convert_to_tensor(lso.step_counter.value)
    scale = tf.convert_to_tensor(lso.dynamic_scale.value)
    grow = tf.equal(counter, tf.cast(lso.dynamic_growth_steps - 1, counter.dtype))
    new_counter = tf.where(finite, tf.where(grow, tf.zeros_like(counter), counter + 1), tf.zeros_like(counter))
    new_scale = tf.where(finite, tf.where(grow, scale * 2.0, scale), scale * 0.5)
    return [(lso.step_counter, new_counter), (lso.dynamic_scale, new_scale)]
