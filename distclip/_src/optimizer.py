"""The optimizer's own step on gradients that are already synchronized, skipped on every replica together.

distclip reduces the gradients once and clips them; the update is then the
optimizer's own `apply`, whatever it overrides (`_backend_update_step` as
Nadam does, `_apply_weight_decay` as Muon does, `update_step`, or `apply`
itself as `MultiOptimizer` does), with two changes of context:

  * no second reduction: Keras's TensorFlow optimizer sums the gradients
    across replicas in one hook, `_all_reduce_sum_gradients`, which returns
    them unchanged when there is no replica context. While distclip applies,
    that hook is the identity on the optimizer and every optimizer it wraps
    (`no_second_reduction`), checked when an optimizer is accepted; the
    op-count tests fail if a reduction ever comes back. It and the other
    private Keras and TensorFlow names distclip uses are in
    `distclip._src.internals`.
  * a lockstep skip: the whole `apply` (slots, `iterations`, per-step state
    such as Nadam's `u_product`) sits in one branch taken on every replica
    from a predicate that is identical everywhere (`distclip._src.lockstep`).

This module is also where an optimizer is accepted or refused, by what it
would do (`check_optimizer`), and built (`ensure_built`).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import keras
import tensorflow as tf

from distclip._src import internals
from distclip._src.variables import variable_name
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.lockstep import create_variables, run_if


def optimizers_in(optimizer: Any) -> List[Any]:
    """`optimizer` and every Keras optimizer it holds (a LossScaleOptimizer's inner, MultiOptimizer's), once each."""
    found: List[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, keras.optimizers.Optimizer) and not any(value is f for f in found):
            found.append(value)
            for attr in vars(value).values():
                walk(attr)

    walk(optimizer)
    return found


def check_optimizer(optimizer: Any, nonfinite: str) -> None:
    """Refuses what distclip cannot run as the optimizer's own step would, with the class and the feature named.

    Checked on the optimizer and every optimizer it wraps. A
    `keras.optimizers.LossScaleOptimizer` is accepted around a plain optimizer
    (see `distclip._src.update`), with `nonfinite="skip"`.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ArgumentError(f"optimizer must be a Keras 3 optimizer (keras.optimizers.Optimizer); got {optimizer!r}")
    for opt in optimizers_in(optimizer):
        name = type(opt).__name__
        if not internals.has_reduction_hook(opt):
            raise ArgumentError(
                f"optimizer {name} has no {internals.REDUCTION_HOOK}: distclip needs Keras 3 on the TensorFlow backend "
                f"(keras {keras.__version__}, backend {keras.backend.backend()})")
        if getattr(opt, "_distclip_wrapper", False):
            raise ArgumentError(
                f"optimizer {name} already clips the synchronized gradients; pass the optimizer it wraps")
        for attr in ("clipnorm", "clipvalue", "global_clipnorm"):
            if getattr(opt, attr, None) is not None:
                raise ArgumentError(
                    f"optimizer {name} has {attr}={getattr(opt, attr)!r}: distclip clips the synchronized gradients "
                    f"itself; create the optimizer without {attr}")
        if getattr(opt, "gradient_accumulation_steps", None):
            raise ArgumentError(
                f"optimizer {name} has gradient_accumulation_steps={opt.gradient_accumulation_steps!r}, which would "
                "accumulate after distclip's clip: use distclip's accumulation_steps instead (it clips the mean "
                "of the accumulated, synchronized gradients)")
        if getattr(opt, "ema_overwrite_frequency", None) and internals.strategy_merges():
            raise ArgumentError(
                f"optimizer {name} has ema_overwrite_frequency={opt.ema_overwrite_frequency!r} under "
                f"{type(tf.distribute.get_strategy()).__name__}, where Keras's own apply fails too (it overwrites "
                "the weights from a cond in the replica context); leave it None and call "
                "optimizer.finalize_variable_values(model.trainable_variables) when training ends")
        if getattr(opt, "loss_scale_factor", None) is not None:
            raise ArgumentError(
                f"optimizer {name} has loss_scale_factor={opt.loss_scale_factor!r}: the norm would be that of the "
                "scaled gradients; use keras.optimizers.LossScaleOptimizer inside distclip instead")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if nonfinite != "skip":
            raise ArgumentError(
                "optimizer is a LossScaleOptimizer, whose overflowing steps must be skipped; "
                f"got nonfinite={nonfinite!r} (use the default nonfinite='skip')")
        inner = optimizer.inner_optimizer
        if isinstance(inner, keras.optimizers.LossScaleOptimizer):
            raise ArgumentError(f"optimizer.inner_optimizer is a {type(inner).__name__}: wrap the plain optimizer only")


def check_variables(optimizer: Any, variables: Sequence[Any]) -> None:
    """Variables that Keras would overwrite with their gradient (float8 training) are refused, by name."""
    for v in variables:
        if getattr(v, "overwrite_with_gradient", False):
            raise ArgumentError(
                f"variable {variable_name(v)} has overwrite_with_gradient=True (float8 training): its "
                f"'gradient' is a new value, not a gradient, and must not enter the global norm; "
                f"{type(optimizer).__name__} with such variables is not supported by distclip")


def check_known(optimizer: Any, variables: Sequence[Any]) -> None:
    """Every variable must be one the built optimizer was built for (Keras's own check), named if not."""
    for i, v in enumerate(variables):
        try:
            internals.check_variables_are_known(optimizer, [v])
        except ValueError:
            raise ArgumentError(
                f"trainable_variables[{i}] ({variable_name(v)}) is not one of the "
                f"{len(internals.built_variables(optimizer))} variables {type(optimizer).__name__} was built for: an "
                "optimizer (and the ClipStep or ClipOptimizer around it) serves one set of variables; create new "
                "ones for another model") from None


def check_strategy(optimizer: Any, owner_strategy: tf.distribute.Strategy, owner: str) -> None:
    """The optimizer and its distclip owner must belong to the strategy that is running."""
    current = tf.distribute.get_strategy()
    for what, expected in (("optimizer", internals.optimizer_strategy(optimizer)),
                           (owner, owner_strategy)):
        if expected is not current:
            raise ContextError(
                f"the {what} was created under {type(expected).__name__} but is used under "
                f"{type(current).__name__}: create the model, the optimizer and the {owner} inside "
                "strategy.scope() of the strategy that runs the step")


def ensure_built(optimizer: Any, stepper: Any, variables: Sequence[Any]) -> None:
    """Builds `optimizer` for `variables` now if it is not built, from wherever the step runs, after checking
    them (`check_variables`); then checks that `stepper`, the optimizer that updates, was built for them."""
    check_variables(stepper, variables)
    if not optimizer.built:
        create_variables(lambda: optimizer.build(list(variables)), reads=variables)
    check_known(stepper, variables)


_lock = threading.Lock()
_depth: Dict[int, int] = {}


def _identity(grads_and_vars):
    return list(grads_and_vars)


@contextlib.contextmanager
def no_second_reduction(optimizer: Any) -> Iterator[None]:
    """While inside, `optimizer` and the optimizers it wraps do not reduce the gradients they apply.

    Replica threads (MirroredStrategy) may enter concurrently: the hook is set
    by the first to enter and removed by the last to leave.
    """
    opts = optimizers_in(optimizer)
    with _lock:
        for opt in opts:
            if _depth.get(id(opt), 0) == 0:
                internals.set_reduction(opt, _identity)
            _depth[id(opt)] = _depth.get(id(opt), 0) + 1
    try:
        yield
    finally:
        with _lock:
            for opt in opts:
                _depth[id(opt)] -= 1
                if not _depth[id(opt)]:
                    del _depth[id(opt)]
                    internals.restore_reduction(opt)


def apply_in_lockstep(optimizer: Any, grads: Sequence[Any], variables: Sequence[Any], ok: tf.Tensor, *,
                      skip: bool, assign_on_apply: Sequence[Tuple[Any, tf.Tensor]] = (),
                      count_skip: Any = None) -> tf.Tensor:
    """`optimizer.apply(grads, variables)` where `ok`, skipped on every replica together where not.

    `grads` are synchronized (identical on every replica) and `ok` is a bool
    scalar decided from them. Along with the update, each (variable, value) of
    `assign_on_apply` is assigned (a threshold policy's state); a skipped step
    adds 1 to `count_skip`. Without `skip` the update always runs, after `ok`
    (so a failed check upstream applies nothing). `None` gradients are left
    out, as `optimizer.apply` leaves them. Returns whether the update ran.
    """
    pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    targets = [v for _, v in pairs]
    state = [v for v, _ in assign_on_apply]

    def update(grads, values) -> None:
        with no_second_reduction(optimizer):
            optimizer.apply(grads, targets)
        for var, value in zip(state, values, strict=True):
            var.assign(value)

    def skipped(grads, values) -> None:
        if count_skip is not None:
            count_skip.assign_add(tf.ones([], count_skip.dtype))

    args = ([g for g, _ in pairs], [value for _, value in assign_on_apply])
    if skip:
        return run_if(ok, update, skipped, args)
    with tf.control_dependencies([ok]):
        update(*args)
        return tf.identity(ok)
