"""`ClipStep`: synchronize once, clip, and apply the update with a Keras 3 optimizer once."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from distclip import sync, update
from distclip.accumulate import Accumulation, check_steps
from distclip.checks import NONFINITE, check_choice, check_pairs, check_wire, split_pairs
from distclip.clip import clip_synchronized
from distclip.result import ClipResult
from distclip.threshold import ClipNorm, MakeVariable, Threshold


class ClipStep(tf.Module):
    """A training step's gradient path: all-reduce, global-norm clip, one optimizer update.

    Create it under the strategy's scope, like the model and the optimizer, and
    call `apply` inside `strategy.run` (or with no strategy):

        with strategy.scope():
            model = ...
            optimizer = keras.optimizers.Adam(1e-3)
            clip = distclip.ClipStep(optimizer, clip_norm=1.0)

        @tf.function
        def train_step(x, y):
            def replica_fn(x, y):
                with tf.GradientTape() as tape:
                    loss = tf.nn.compute_average_loss(loss_fn(y, model(x)), global_batch_size=B)
                grads = tape.gradient(loss, model.trainable_variables)
                return clip.apply(grads, model.trainable_variables)
            return strategy.run(replica_fn, args=(x, y))

    Per step: the gradients are reduced across replicas in one packed collective
    (no second reduction inside the optimizer), `scale = min(1, clip_norm /
    global_norm)` is applied, and `optimizer.update_step` runs once per variable.
    `clip_norm` may be a number, a scalar tensor or variable, a callable of the
    optimizer's iteration count (a Keras `LearningRateSchedule` works), or a
    policy (`distclip.AutoClip`, `distclip.SpikeClip`) whose state this module
    keeps in variables (`policy_state`, saved by `tf.train.Checkpoint`) and
    updates from the synchronized norm, identically on every replica.

    `backend`, `reduction`, `sparse_as_dense` and `compression` mean what they
    mean for `sync_and_clip`; under Horovod (`backend="auto"` finds it) each
    process is one replica and gradients are averaged.

    `accumulation_steps=k`: each call adds this replica's gradients to local
    sums; every k-th call reduces them once, clips their mean and applies it
    (one step on a k-times-larger batch); `apply` then returns the latest
    update's result, with `grads` of `None`. See `distclip.accumulate`.

    `optimizer` may be a `keras.optimizers.LossScaleOptimizer` (mixed
    precision; scale the loss with `optimizer.scale_loss`): the norm is that of
    the unscaled gradients, one multiply unscales and clips, and an overflow
    anywhere skips the step and halves the scale on every replica.

    `nonfinite="skip"` (default): when the synchronized norm is inf or NaN, every
    replica skips the step together; variables, optimizer slots and
    `optimizer.iterations` stay as they were and `skipped_steps` grows by one.
    "raise" fails the step instead; "propagate" applies NaN gradients, as
    `tf.clip_by_global_norm` followed by `optimizer.apply` would.
    """

    def __init__(
        self,
        optimizer: Any,
        clip_norm: ClipNorm,
        *,
        nonfinite: str = "skip",
        reduction: str = "auto",
        backend: str = "auto",
        sparse_as_dense: bool = False,
        compression: Optional[str] = None,
        accumulation_steps: int = 1,
        name: str = "clip_step",
    ):
        super().__init__(name=name)
        self._options = StepOptions.check(
            optimizer, nonfinite, reduction, backend, sparse_as_dense, compression, accumulation_steps)
        self.nonfinite, self.reduction, self.backend, self.sparse_as_dense, self.compression, steps = self._options
        self.optimizer = optimizer
        self._strategy = tf.distribute.get_strategy()
        with tf.name_scope(name):
            self._state = StepState(_variable)
            self._threshold = Threshold(clip_norm, _variable)
        #: Steps skipped because the synchronized global norm was not finite.
        self.skipped_steps = self._state.skipped_steps
        self.accumulation = Accumulation(steps) if steps > 1 else None
        self.clip_norm = clip_norm
        #: The policy's state variables by name (empty unless `clip_norm` is a policy).
        self.policy_state = self._threshold.state

    def build(self, trainable_variables: Sequence[Any]) -> None:
        """Creates the optimizer's variables (and the accumulators) now, otherwise done on the first `apply`."""
        update.build(self.optimizer, trainable_variables)
        if self.accumulation is not None:
            self.accumulation.build(list(trainable_variables))

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any]) -> ClipResult:
        """Synchronizes `grads`, clips them by their global norm and applies them to `trainable_variables`."""
        update.check_strategy(update.loss_scaling(self.optimizer)[0], self._strategy, "ClipStep")
        return clip_and_apply(
            self.optimizer, grads, trainable_variables, self._threshold, self._state, caller="ClipStep.apply",
            accumulation=self.accumulation, record=False, **self._options.for_clip(),
        )

    def apply_gradients(self, grads_and_vars: Iterable[Tuple[Any, Any]]) -> ClipResult:
        """`apply` for `(gradient, variable)` pairs, as Keras 2's `optimizer.apply_gradients` took them."""
        grads, variables = split_pairs(grads_and_vars)
        return self.apply(grads, variables)


class StepOptions(NamedTuple):
    """The options `ClipStep` and `distclip.keras.ClipOptimizer` share (see `ClipStep`)."""

    nonfinite: str
    reduction: str
    backend: str
    sparse_as_dense: bool
    compression: Optional[str]
    accumulation_steps: int

    @classmethod
    def check(cls, optimizer: Any, nonfinite: Any, reduction: Any, backend: Any, sparse_as_dense: Any,
              compression: Any, accumulation_steps: Any) -> "StepOptions":
        """The options, checked with the optimizer; each error names the argument and its value."""
        check_choice("nonfinite", nonfinite, NONFINITE)
        update.check_optimizer(optimizer, nonfinite)
        check_choice("reduction", reduction, sync.REDUCTIONS)
        check_choice("backend", backend, sync.BACKENDS)
        check_wire(sparse_as_dense, compression)
        return cls(nonfinite, reduction, backend, sparse_as_dense, compression, check_steps(accumulation_steps))

    def for_clip(self) -> Dict[str, Any]:
        """What `clip_and_apply` takes as `**options` (accumulation goes in as an `Accumulation`)."""
        return {k: v for k, v in self._asdict().items() if k != "accumulation_steps"}


def _variable(name: str, shape: Tuple[int, ...], dtype: tf.DType, initial: float) -> tf.Variable:
    """A variable identical on every replica, written only with values that are."""
    return tf.Variable(
        tf.fill(shape, tf.constant(initial, dtype)), trainable=False, name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class StepState:
    """What a clip step keeps besides the optimizer's state, in variables made by `make_variable`.

    `skipped_steps` counts updates skipped for a non-finite norm; `global_norm`
    (before clipping), `clip_norm` (the threshold used), `clip_scale` and
    `finite` are those of the latest update, identical on every replica.
    """

    def __init__(self, make_variable: MakeVariable):
        self.skipped_steps = make_variable("skipped_steps", (), tf.int64, 0)
        self.global_norm = make_variable("global_norm", (), tf.float32, 0.0)
        self.clip_norm = make_variable("clip_norm", (), tf.float32, 0.0)
        self.clip_scale = make_variable("clip_scale", (), tf.float32, 1.0)
        self.finite = make_variable("finite", (), tf.int64, 1)

    def records(self, result: ClipResult, threshold: tf.Tensor) -> List[Tuple[Any, tf.Tensor]]:
        return [(self.global_norm, result.global_norm), (self.clip_norm, threshold), (self.clip_scale, result.scale),
                (self.finite, tf.cast(result.finite, tf.int64))]

    def latest(self, n: int) -> ClipResult:
        """The latest update's result, read back (its gradients are not kept: `None`)."""
        read = [tf.convert_to_tensor(v.value if isinstance(v, keras.Variable) else v)
                for v in (self.global_norm, self.clip_norm, self.clip_scale, self.finite)]
        norm, threshold, scale, finite = read
        finite = tf.cast(finite, tf.bool)
        return ClipResult(grads=[None] * n, global_norm=norm, scale=scale,
                          clipped=tf.logical_and(finite, norm > threshold), finite=finite)


def clip_and_apply(
    optimizer: Any,
    grads: Sequence[Any],
    trainable_variables: Sequence[Any],
    threshold: Threshold,
    state: StepState,
    *,
    caller: str,
    accumulation: Optional[Accumulation] = None,
    record: bool = True,
    **options: Any,
) -> ClipResult:
    """The step `ClipStep` and `distclip.keras.ClipOptimizer` share.

    `options`: `nonfinite`, `reduction`, `backend`, `sparse_as_dense`,
    `compression`. With `accumulation`, the update happens on every k-th call
    and the result returned is that of the latest update. `record=False` does
    not write the latest update's values into `state` (always written when
    accumulating, which returns them).
    """
    grads, variables = check_pairs(grads, trainable_variables)
    sync.check_replica_context(caller)
    update.build(optimizer, variables)
    if accumulation is None:
        return _update(optimizer, grads, variables, threshold, state, caller, 1, options, record)
    accumulation.build(variables, [g is not None for g in grads])
    ran = accumulation.run(grads, lambda sums: _update(
        optimizer, sums, variables, threshold, state, caller, accumulation.steps, options, True).scale)
    with tf.control_dependencies([ran]):
        return state.latest(len(grads))


def _update(optimizer, grads, variables, threshold, state, caller, micro_batches, options, record) -> ClipResult:
    optimizer, lso = update.loss_scaling(optimizer)
    loss_scale = tf.convert_to_tensor(lso.dynamic_scale) if lso is not None else None
    result, used = clip_synchronized(grads, threshold.at(optimizer.iterations), caller=caller,
                                     micro_batches=micro_batches, loss_scale=loss_scale, **options)
    # Nothing is applied before every check of this step has passed: the
    # threshold's and, with nonfinite="raise", the norm's (both feed `scale`).
    with tf.control_dependencies([result.scale]):
        ok = tf.identity(result.finite)
    update.apply_update(
        optimizer, result.grads, variables, ok,
        skip_if_not_ok=options["nonfinite"] == "skip", skipped_counter=state.skipped_steps,
        assignments=threshold.updates(result.global_norm, result.finite),
        records=(state.records(result, used) if record else []) + (
            update.loss_scale_updates(lso, result.finite) if lso else []),
    )
    return result
