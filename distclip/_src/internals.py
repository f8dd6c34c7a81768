"""Every private Keras and TensorFlow API distclip uses, in one place, each checked where it is used.

When a Keras or TensorFlow release moves one of these names, the entry that
uses it raises `InternalAPIError` naming the name and the installed versions,
not an `AttributeError` from deep inside a step. `tests/unit/test_internals.py`
checks every entry against the installed Keras and TensorFlow (and so, in CI,
against the newest and the oldest tested): it fails the day upstream changes one.

Keras optimizer (`keras.src.optimizers.base_optimizer`, `keras.src.backend.tensorflow.optimizer`):
  * `_all_reduce_sum_gradients`: the TensorFlow optimizer's cross-replica sum, replaced by the identity
    while distclip applies gradients it reduced already (`set_reduction`, `restore_reduction`);
  * `_check_variables_are_known` and `_trainable_variables`: the variables a built optimizer serves;
  * `_distribution_strategy`: the strategy an optimizer was created under;
  * `_variables`: an optimizer's own variables, without those of the optimizers it wraps;
  * `_learning_rate` and `_get_current_learning_rate`: where an optimizer keeps its learning rate (a
    variable, a schedule or a callable) and how `apply` reads it (`learning_rate_times`, after a rewind);
  * the moment slots of each optimizer class in `MOMENT_SLOTS` (`_momentums`, `_velocities`, ...), which a
    rewind with `reset_moments` sets to zero.
TensorFlow:
  * `tf.__internal__.distribute.strategy_supports_no_merge_call`: whether a strategy steps through
    `merge_call` (MirroredStrategy on CPU does);
  * `extended._in_multi_worker_mode`: a MultiWorkerMirroredStrategy with more than one worker;
  * `extended._host_input_device`: the strategy's one device on this host (where the rewind's ring goes);
  * `Trackable._trackable_children`: the hook a checkpoint calls to list an object's children
    (`CheckedOnSave`).
Keras trainer (`keras.src.backend.tensorflow.trainer`), for the MultiWorkerMirroredStrategy `fit` fix:
  * `TensorFlowTrainer._maybe_symbolic_build`, `_symbolic_build` and `_distribute_strategy`;
  * the module function `reduce_per_replica`.
"""
from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from distclip._src.errors import ArgumentError, ContextError

#: The releases these entries were checked with, for the error message.
TESTED = "Keras 3.15 with TensorFlow 2.17 to 2.21"
REDUCTION_HOOK = "_all_reduce_sum_gradients"


class InternalAPIError(ContextError):
    """A private Keras or TensorFlow name that distclip relies on is missing from the installed release."""


def _missing(where: str) -> InternalAPIError:
    return InternalAPIError(
        f"distclip relies on {where}, which this Keras {keras.version()} / TensorFlow {tf.__version__} does not "
        f"have (checked with {TESTED}); install a tested release or report it to distclip")


def _require(owner: Any, name: str, where: str) -> Any:
    value = getattr(owner, name, None)
    if value is None:
        raise _missing(where)
    return value


def has_reduction_hook(optimizer: Any) -> bool:
    """Whether `optimizer` is a Keras TensorFlow optimizer with the cross-replica sum distclip replaces."""
    return callable(getattr(type(optimizer), REDUCTION_HOOK, None))


def set_reduction(optimizer: Any, reduce: Callable[[Any], Any]) -> None:
    """Makes `reduce` this optimizer's cross-replica sum of (gradient, variable) pairs, on the instance."""
    if not has_reduction_hook(optimizer):
        raise _missing(f"{type(optimizer).__name__}.{REDUCTION_HOOK}")
    setattr(optimizer, REDUCTION_HOOK, reduce)


def restore_reduction(optimizer: Any) -> None:
    """Gives the optimizer its class's own cross-replica sum back (undoes `set_reduction`)."""
    optimizer.__dict__.pop(REDUCTION_HOOK, None)


def check_variables_are_known(optimizer: Any, variables: Sequence[Any]) -> None:
    """Keras's own check that a built `optimizer` serves `variables`: raises ValueError if not."""
    _require(optimizer, "_check_variables_are_known", "keras.optimizers.Optimizer._check_variables_are_known")(
        list(variables))


def built_variables(optimizer: Any) -> List[Any]:
    """The trainable variables a built `optimizer` serves, in the order it was built with."""
    return list(_require(optimizer, "_trainable_variables", "keras.optimizers.Optimizer._trainable_variables"))


def optimizer_strategy(optimizer: Any) -> tf.distribute.Strategy:
    """The tf.distribute strategy `optimizer` was created under (the default strategy outside any scope)."""
    return _require(optimizer, "_distribution_strategy", "keras.optimizers.Optimizer._distribution_strategy")


def own_variables(optimizer: Any) -> List[Any]:
    """The variables `optimizer` made itself (`iterations`, its slots), not those of an optimizer it wraps."""
    return list(_require(optimizer, "_variables", "keras.optimizers.Optimizer._variables"))


class _ScaledRate:
    """Stands for an optimizer's `_learning_rate` while replicas apply: each replica thread reads its own rate."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.rates: Dict[int, tf.Tensor] = {}

    def __call__(self) -> tf.Tensor:
        return self.rates[threading.get_ident()]


_rate_lock = threading.Lock()


@contextlib.contextmanager
def learning_rate_times(optimizer: Any, factor: tf.Tensor) -> Iterator[None]:
    """Within the block (traced into the step), `optimizer.learning_rate` is its value now times `factor`.

    Keras's `apply` reads the rate through `_get_current_learning_rate()` (the
    variable of a float rate, a schedule at `iterations`, or a callable's
    value); for the block `_learning_rate` is a callable returning that value
    times `factor`, so the update and the decoupled weight decay both use it.
    MirroredStrategy traces its replicas in threads, one at a time, each
    pausing inside `apply` (at its `merge_call`) while the others enter: each
    thread reads its own rate; the first to enter installs the callable and
    the last to leave puts the original back.
    """
    current = _require(optimizer, "_get_current_learning_rate", "keras.optimizers.Optimizer._get_current_learning_rate")
    if "_learning_rate" not in vars(optimizer):
        raise _missing("keras.optimizers.Optimizer._learning_rate")
    me = threading.get_ident()
    with _rate_lock:
        installed = vars(optimizer)["_learning_rate"]
        scaled = installed if isinstance(installed, _ScaledRate) else _ScaledRate(installed)
        # object.__setattr__: Keras's tracking would record these as the optimizer's state.
        object.__setattr__(optimizer, "_learning_rate", scaled.original)  # Keras reads the rate as it is
        try:
            rate = tf.convert_to_tensor(current())
        finally:
            object.__setattr__(optimizer, "_learning_rate", scaled)
        scaled.rates[me] = rate * tf.cast(factor, rate.dtype)
    try:
        yield
    finally:
        with _rate_lock:
            del scaled.rates[me]
            if not scaled.rates:
                object.__setattr__(optimizer, "_learning_rate", scaled.original)


#: The moment slots `Rewind(reset_moments=True)` sets to zero, by `keras.optimizers` class name (a subclass, such
#: as AdamW, has its parent's): attributes each holding one slot variable per trainable variable, the first always
#: present once built, the others where an option makes them (Adam's amsgrad, RMSprop's momentum and centered).
MOMENT_SLOTS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Adam", ("_momentums", "_velocities", "_velocity_hats")),
    ("Nadam", ("_momentums", "_velocities")),
    ("Lamb", ("_momentums", "_velocities")),
    ("Adamax", ("_m", "_u")),
    ("Lion", ("_momentums",)),
    ("RMSprop", ("_velocities", "_momentums", "_average_gradients")),
    ("SGD", ("momentums",)),
)


def moment_slot_names(optimizer: Any) -> Tuple[str, ...]:
    """The attributes of `optimizer`'s moment slots (`MOMENT_SLOTS`).

    Raises:
      ArgumentError: an optimizer without moment slots, or one distclip does not know, named.
    """
    for name, slots in MOMENT_SLOTS:
        cls = getattr(keras.optimizers, name, None)  # an older Keras 3 may lack one
        if cls is not None and isinstance(optimizer, cls):
            if name == "SGD" and not optimizer.momentum:
                raise ArgumentError("reset_moments=True: SGD(momentum=0) has no moment slots to reset")
            return slots
    known = ", ".join(name for name, _ in MOMENT_SLOTS)
    raise ArgumentError(f"reset_moments=True: {type(optimizer).__name__} has no moment slots distclip knows "
                        f"(it resets those of {known} and their subclasses); got optimizer={optimizer!r}")


def moment_slots(optimizer: Any) -> List[Any]:
    """The moment slot variables of a built `optimizer` (`moment_slot_names`), in attribute order."""
    names = moment_slot_names(optimizer)
    slots = []
    for i, name in enumerate(names):
        values = getattr(optimizer, name, None)
        if values is None and i == 0:
            raise _missing(f"{type(optimizer).__name__}.{name}")
        slots += [v for v in values or [] if v is not None]
    return slots


def strategy_merges() -> bool:
    """Whether the strategy in scope steps through `merge_call` (MirroredStrategy on CPU does)."""
    if not tf.distribute.has_strategy():
        return False
    supports = _require(tf.__internal__.distribute, "strategy_supports_no_merge_call",
                        "tf.__internal__.distribute.strategy_supports_no_merge_call")
    return not supports()


def in_multi_worker_mode(strategy: Any) -> bool:
    """Whether `strategy` is a MultiWorkerMirroredStrategy over more than one worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return bool(_require(strategy.extended, "_in_multi_worker_mode",
                         "MultiWorkerMirroredStrategy.extended._in_multi_worker_mode")())


def host_input_device(strategy: tf.distribute.Strategy) -> Optional[Any]:
    """The strategy's one device on this host, where it puts what is not mirrored (numpy input); None for a
    strategy without one (TPUStrategy)."""
    return getattr(strategy.extended, "_host_input_device", None)


class CheckedOnSave(tf.Module):
    """A `tf.Module` whose `check_on_save()` runs when an eager `tf.train.Checkpoint` (or a SavedModel) lists
    its children, before anything of it is written: Trackable's `_trackable_children` hook."""

    def check_on_save(self) -> None:
        """Raises to refuse the save (override it)."""

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        if tf.executing_eagerly():
            self.check_on_save()
        return super()._trackable_children(save_type, **kwargs)


def _trainer() -> types.ModuleType:
    try:
        from keras.src.backend.tensorflow import trainer
    except ImportError:
        raise _missing("keras.src.backend.tensorflow.trainer") from None
    return trainer


def trainer_functions() -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """Keras's `TensorFlowTrainer._maybe_symbolic_build` and `reduce_per_replica`, as they are now."""
    trainer = _trainer()
    return (_require(trainer.TensorFlowTrainer, "_maybe_symbolic_build", "TensorFlowTrainer._maybe_symbolic_build"),
            _require(trainer, "reduce_per_replica", "keras.src.backend.tensorflow.trainer.reduce_per_replica"))


def replace_trainer_functions(build: Callable[..., Any], reduce: Callable[..., Any]) -> None:
    """Makes `build` and `reduce` Keras's `TensorFlowTrainer._maybe_symbolic_build` and `reduce_per_replica`."""
    trainer = _trainer()
    trainer.TensorFlowTrainer._maybe_symbolic_build = build
    vars(trainer)["reduce_per_replica"] = reduce  # a module function: the trainer calls it by this name


def trainer_strategy(model: Any) -> Optional[tf.distribute.Strategy]:
    """The strategy a Keras model was created under (None without one)."""
    if not hasattr(model, "_distribute_strategy"):
        raise _missing("TensorFlowTrainer._distribute_strategy")
    return model._distribute_strategy


def symbolic_build(model: Any, data_batch: Any) -> None:
    """Builds a Keras model's metrics, loss and optimizer from one batch's shapes and dtypes."""
    _require(model, "_symbolic_build", "TensorFlowTrainer._symbolic_build")(data_batch=data_batch)
