"""Applying an update with a Keras 3 optimizer, once, on every replica, optionally skipped.

This is the only module that knows Keras 3's TensorFlow optimizer internals
(including how a LossScaleOptimizer's dynamic scale moves).
`optimizer.apply` cannot be used for a synchronized clip step:
  * inside a replica context it SUM-all-reduces the gradients again;
  * a step that must be skipped on every replica cannot wrap it in `tf.cond`,
    because its `merge_call` may not sit inside control flow under
    MirroredStrategy ("merge_call called while defining a new graph").
So this module does what `optimizer.apply` does for one step: weight decay,
`optimizer.update_step` (the documented per-variable extension point),
variable constraints and the iteration count. It goes through `maybe_merge_call`
as Keras does, with no reduction, and from the cross-replica context runs, on
each device, one `tf.cond` around all of that device's updates, on a predicate
that is identical on every replica (decided from the synchronized norm).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from distclip.errors import ArgumentError, ContextError


def check_optimizer(optimizer: Any, nonfinite: str = "skip") -> None:
    """Rejects optimizers whose own `apply` features distclip would silently skip.

    A `keras.optimizers.LossScaleOptimizer` is taken apart (see `loss_scaling`):
    its inner optimizer is checked, and its non-finite steps must be skipped.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ArgumentError(f"optimizer must be a Keras 3 optimizer (keras.optimizers.Optimizer); got {optimizer!r}")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if nonfinite != "skip":
            raise ArgumentError(
                f"optimizer is a LossScaleOptimizer, whose overflowing steps must be skipped; got nonfinite={nonfinite!r} "
                "(use the default nonfinite='skip')"
            )
        inner = optimizer.inner_optimizer
        if getattr(inner, "inner_optimizer", None) is not None:  # another wrapper (LossScaleOptimizer, ClipOptimizer)
            raise ArgumentError(f"optimizer.inner_optimizer is a {type(inner).__name__}: wrap the plain optimizer only")
        optimizer = inner
    for attr in ("clipnorm", "clipvalue", "global_clipnorm"):
        value = getattr(optimizer, attr, None)
        if value is not None:
            raise ArgumentError(
                f"optimizer has {attr}={value!r}; ClipStep does the clipping on the synchronized gradients, "
                f"so create the optimizer without {attr}"
            )
    for attr in ("use_ema", "gradient_accumulation_steps", "loss_scale_factor"):
        value = getattr(optimizer, attr, None)
        if value:
            raise ArgumentError(f"optimizer has {attr}={value!r}, which ClipStep does not support yet")


def check_strategy(optimizer: Any, strategy: tf.distribute.Strategy, what: str) -> None:
    """The optimizer and the `ClipStep` must belong to the strategy that is running."""
    current = tf.distribute.get_strategy()
    for owner, expected in (("optimizer", getattr(optimizer, "_distribution_strategy", current)), (what, strategy)):
        if expected is not current:
            raise ContextError(
                f"the {owner} was created under {type(expected).__name__} but is used under "
                f"{type(current).__name__}: create the model, the optimizer and the ClipStep inside "
                "strategy.scope() of the strategy that runs the step"
            )


def build(optimizer: Any, variables: Sequence[Any]) -> None:
    """Creates the optimizer's slot variables outside any traced function.

    Creating them lazily inside a traced replica function fails under
    MirroredStrategy; `tf.init_scope` lifts the creation out to eager mode.
    """
    if optimizer.built:
        return
    with tf.init_scope():
        optimizer.build(list(variables))


def _tf_variable(variable: Any) -> tf.Variable:
    return variable.value if isinstance(variable, keras.Variable) else variable


def apply_update(
    optimizer: Any,
    grads: Sequence[Any],
    variables: Sequence[Any],
    ok: tf.Tensor,
    *,
    skip_if_not_ok: bool,
    skipped_counter: Optional[tf.Variable] = None,
    assignments: Sequence[Tuple[Any, tf.Tensor]] = (),
    records: Sequence[Tuple[Any, tf.Tensor]] = (),
) -> None:
    """One optimizer step with `grads` (already synchronized), without reducing them.

    `ok`: a bool scalar, identical on every replica, that everything here waits
    for (so a failed check upstream leaves every variable as it was). With
    `skip_if_not_ok`, where `ok` is False no variable, slot or iteration count
    changes and `skipped_counter` grows by 1. `None` entries in `grads` are left
    out, as `optimizer.apply` does. `assignments`: (variable, value) pairs,
    values identical on every replica, assigned along with the update (a
    threshold policy's state); `records`: the same, assigned on skipped steps
    too (what the step saw, for logging).

    Each device runs one `tf.cond` around all of its updates
    (`strategy.extended.update_non_slot` calls `on_device` once per device,
    with that device's components of the variables and gradients, in the same
    update context `strategy.extended.update` uses).
    """
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    keras_vars = [v for _, v in pairs]
    decays = [optimizer.weight_decay is not None and optimizer._use_weight_decay(v) for v in keras_vars]
    constraints = [getattr(v, "constraint", None) for v in keras_vars]
    learning_rate = optimizer.learning_rate

    def on_device(grads, tf_vars, iterations, skipped, ok, lr, state_vars, state_values, record_vars, record_values):
        with tf.control_dependencies([ok]):
            for var, value in zip(record_vars, record_values):
                var.assign(value)

        def update():
            for grad, var, decay, constraint in zip(grads, tf_vars, decays, constraints):
                if decay:
                    var.assign_sub(var * tf.cast(optimizer.weight_decay, var.dtype) * tf.cast(lr, var.dtype))
                optimizer.update_step(grad, var, lr)
                if constraint is not None:
                    var.assign(constraint(var))
            for var, value in zip(state_vars, state_values):
                var.assign(value)
            iterations.assign_add(tf.ones([], iterations.dtype))
            return tf.constant(True)

        def skip():
            if skipped is not None:
                skipped.assign_add(tf.ones([], skipped.dtype))
            return tf.constant(False)

        if skip_if_not_ok:
            return tf.cond(ok, update, skip)
        with tf.control_dependencies([ok]):
            return update()

    tf_vars = [_tf_variable(v) for v in keras_vars]
    iterations = _tf_variable(optimizer.iterations)
    counter = skipped_counter if skip_if_not_ok else None
    state_vars = [_tf_variable(v) for v, _ in assignments]
    record_vars = [_tf_variable(v) for v, _ in records]

    def merge_fn(strategy, grads, ok, lr, state_values, record_values):
        devices = strategy.extended.non_slot_devices(tf_vars)
        strategy.extended.update_non_slot(devices, on_device, group=False, args=(
            grads, tf_vars, iterations, counter, ok, lr, state_vars, state_values, record_vars, record_values))

    with tf.name_scope(optimizer.name):
        present = [g for g, _ in pairs]
        state_values = [value for _, value in assignments]
        record_values = [value for _, value in records]
        if not tf.distribute.has_strategy():  # no strategy, or the default one: nothing to place
            on_device(present, tf_vars, iterations, counter, ok, learning_rate, state_vars, state_values,
                      record_vars, record_values)
        else:
            tf.__internal__.distribute.interim.maybe_merge_call(
                merge_fn, tf.distribute.get_strategy(), present, ok, learning_rate, state_values, record_values
            )


def loss_scaling(optimizer: Any) -> Tuple[Any, Optional[Any]]:
    """(the optimizer that takes the steps, the LossScaleOptimizer around it or None)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer, optimizer
    return optimizer, None


def loss_scale_updates(lso: Any, finite: tf.Tensor) -> List[Tuple[Any, tf.Tensor]]:
    """The dynamic loss scale's next state, as Keras's LossScaleOptimizer computes it, from a shared `finite`.

    Finite: the counter grows, and after `dynamic_growth_steps` finite steps in
    a row the scale doubles; not finite: the scale halves and the counter restarts.
    """
    counter = tf.convert_to_tensor(_tf_variable(lso.step_counter))
    scale = tf.convert_to_tensor(_tf_variable(lso.dynamic_scale))
    grow = tf.equal(counter, tf.cast(lso.dynamic_growth_steps - 1, counter.dtype))
    new_counter = tf.where(finite, tf.where(grow, tf.zeros_like(counter), counter + 1), tf.zeros_like(counter))
    new_scale = tf.where(finite, tf.where(grow, scale * 2.0, scale), scale * 0.5)
    return [(lso.step_counter, new_counter), (lso.dynamic_scale, new_scale)]
