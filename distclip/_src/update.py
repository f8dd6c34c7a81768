"""`ClipUpdate`: the one update that `ClipStep` and `distclip.keras.ClipOptimizer` run.

Per update, top to bottom (`ClipUpdate.step`):

    reduce   g     = sum over replicas of each replica's gradients   (one packed collective, or one per bucket)
    (agc)    a_u   = min(1, clipping * max(||W_u||, eps) / ||f g_u||)   per unit u, with `agc=` (no collective)
    measure  norm  = ||a g||_2 * f        f = 1/n for a mean, 1/k over k micro-batches, 1/S under a loss scale
    (groups) s_k   = min(1, c_k / ||a g_k||_2 f) per group k; norm = ||s a g||_2 f, with `ClipGroups`
    decide   scale = min(1, clip_norm / norm); finite = isfinite(norm)
    scale    g    <- g * a * s * scale * f                          (one multiply; a, s = 1 without agc, groups)
    apply    the optimizer's own `apply(g, variables)`, on every replica, or on none if not finite
    record   norm, threshold, scale, finite (and the loss scale's next value)

The first four are `distclip._src.clip.clip_synchronized`; apply is
`distclip._src.optimizer.apply_in_lockstep`; with `accumulation_steps=k` the
step runs on every k-th call, on the accumulated sums
(`distclip._src.accumulation`). With `rewind=` or `skip_spikes=`, apply is one of
five actions decided from the synchronized norm (`ClipUpdate.take`, `distclip._src.rewind`).

Mixed precision: `LossScaleOptimizer(inner)` is the one order supported. The
loss is multiplied by the dynamic scale S, so the synchronized gradients are S
times the true ones; the norm is that of the gradients divided by S, the one
multiply unscales too, and overflow is decided on that synchronized norm, so
every replica agrees. The inner optimizer's own `apply` takes the step; S
moves as Keras's `LossScaleOptimizer` moves it (`_next_loss_scale`).
"""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from distclip._src import internals, sync
from distclip._src.accumulation import Accumulation
from distclip._src.agc import AGC, unit_axes
from distclip._src.checks import check_pairs
from distclip._src.clip import ClipResult, GroupPlan, clip_synchronized
from distclip._src.groups import ClipGroups
from distclip._src.nonfinite import skips
from distclip._src.optimizer import apply_in_lockstep, check_optimizer, check_strategy, ensure_built, \
    no_second_reduction
from distclip._src.options import StepOptions
from distclip._src.policies import Policy
from distclip._src.threshold import ClipNorm, MakeVariable, Threshold, check_clip_norm
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.lockstep import create_variables, run_switch
from distclip._src.rewind import Rewind, Rewinding, SkipSpikes, owned_variables
from distclip._src.noise import NoiseScale, NoiseState, check_replicas
from distclip._src.variables import identical_variable, read_value, tf_variable


class StepState:
    """What a clip step keeps besides the optimizer's state, in variables made by `make_variable`.

    `skipped_steps` counts updates skipped for a non-finite norm; `global_norm`
    (before clipping), `threshold_used`, `clip_scale` and
    `finite` are those of the latest update, and so are, once the variables
    are known (`create_vectors`), `nonfinite_replicas` and
    `nonfinite_variables` (0/1 per replica and per variable) and, with
    `variable_norms=True`, `variable_norms`. With a `NoiseScale`, `noise`
    holds the noise scale's moving averages. With `groups` (the number of
    `ClipGroups.names`), `group_norms`, `group_clip_norms` and `group_scales`
    hold each group's. Their values are identical on
    every replica, so each replica writes its own copy (no aggregation, no
    communication).
    """

    def __init__(self, make_variable: MakeVariable, noise_scale: Optional[NoiseScale] = None, groups: int = 0):
        self.skipped_steps = make_variable("skipped_steps", (), tf.int64, 0)
        self.global_norm = make_variable("global_norm", (), tf.float32, 0.0)
        self.threshold_used = make_variable("clip_norm", (), tf.float32, 0.0)  # its saved name, as before
        self.clip_scale = make_variable("clip_scale", (), tf.float32, 1.0)
        self.finite = make_variable("finite", (), tf.int64, 1)
        self.noise = None if noise_scale is None else NoiseState(noise_scale, make_variable)
        # Shaped by the replicas and the variables, so made once those are known (`create_vectors`).
        self.nonfinite_replicas: Any = None
        self.nonfinite_variables: Any = None
        self.variable_norms: Any = None
        # With `ClipGroups`, each group's norm, threshold and scale (default group last).
        self.group_norms: Any = None
        self.group_clip_norms: Any = None
        self.group_scales: Any = None
        if groups:
            self.group_norms = make_variable("group_norms", (groups,), tf.float32, 0.0)
            self.group_clip_norms = make_variable("group_clip_norms", (groups,), tf.float32, 0.0)
            self.group_scales = make_variable("group_scales", (groups,), tf.float32, 1.0)

    def create_vectors(self, strategy: tf.distribute.Strategy, replicas: int, variables: int,
                       variable_norms: bool) -> None:
        """Makes the per-replica and per-variable variables once (not saved: they describe the latest update)."""
        if self.nonfinite_replicas is not None:
            return

        def create():
            # Already under the strategy inside its replica function (OneDeviceStrategy); enter it otherwise.
            with contextlib.nullcontext() if tf.distribute.has_strategy() else strategy.scope():
                self.nonfinite_replicas = identical_variable("nonfinite_replicas", (replicas,), tf.int64, 0)
                self.nonfinite_variables = identical_variable("nonfinite_variables", (variables,), tf.int64, 0)
                if variable_norms:
                    self.variable_norms = identical_variable("variable_norms", (variables,), tf.float32, 0.0)

        create_variables(create)

    def record(self, result: ClipResult, threshold: tf.Tensor, group_thresholds: Optional[tf.Tensor] = None) -> None:
        for var, value in ((self.global_norm, result.global_norm), (self.threshold_used, threshold),
                           (self.group_norms, result.group_norms), (self.group_clip_norms, group_thresholds),
                           (self.group_scales, result.group_scales),
                           (self.clip_scale, result.scale), (self.finite, tf.cast(result.finite, tf.int64)),
                           (self.nonfinite_replicas, tf.cast(result.nonfinite_replicas, tf.int64)),
                           (self.nonfinite_variables, tf.cast(result.nonfinite_variables, tf.int64)),
                           (self.variable_norms, result.variable_norms)):
            if var is not None:
                var.assign(value)

    def latest(self, n: int) -> ClipResult:
        """The latest update's result, read back (its gradients are not kept: `None`)."""
        norm, threshold, scale, finite = [read_value(v) for v in
                                          (self.global_norm, self.threshold_used, self.clip_scale, self.finite)]
        finite = tf.cast(finite, tf.bool)
        over = norm > threshold
        groups: Any = (None, None)
        if self.group_norms is not None:
            groups = (read_value(self.group_norms), read_value(self.group_scales))
            over = tf.logical_or(over, tf.reduce_any(groups[0] > read_value(self.group_clip_norms)))
        return ClipResult(grads=[None] * n, global_norm=norm, scale=scale,
                          clipped=tf.logical_and(finite, over), finite=finite,
                          nonfinite_replicas=tf.cast(read_value(self.nonfinite_replicas), tf.bool),
                          nonfinite_variables=tf.cast(read_value(self.nonfinite_variables), tf.bool),
                          variable_norms=None if self.variable_norms is None else read_value(self.variable_norms),
                          noise=None if self.noise is None else self.noise.latest(),
                          group_norms=groups[0], group_scales=groups[1])



class ClipUpdate:
    """Synchronize, clip and apply with `optimizer`'s own step (see the module docstring).

    Create it under the strategy's scope: once every argument is checked, it
    makes its state with `make_variable(name, shape, dtype, initial)`
    (tf.Variables for `ClipStep`, Keras variables for `ClipOptimizer`, so
    each is saved the way its owner is). What depends on the variables it
    updates (per-variable vectors, accumulators, the rewind's ring) is made by
    `ensure_built`, by the first step at the latest. `owner` names the public
    class in error messages.
    """

    def __init__(self, optimizer: Any, clip_norm: ClipNorm, options: StepOptions, owner: str,
                 make_variable: MakeVariable, noise_scale: Optional[NoiseScale] = None,
                 rewind: Optional[Rewind] = None, agc: Optional[AGC] = None,
                 skip_spikes: Optional[SkipSpikes] = None):
        check_optimizer(optimizer, options.nonfinite)
        self.optimizer = optimizer
        # The optimizer that takes the steps, and the LossScaleOptimizer around it (or None).
        self.lso = optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None
        self.stepper = optimizer if self.lso is None else optimizer.inner_optimizer
        # With groups, `clip_norm` holds the groups' thresholds and the global one, applied after them.
        self.groups = clip_norm if isinstance(clip_norm, ClipGroups) else None
        self.clip_norm = clip_norm if isinstance(clip_norm, (Policy, ClipGroups)) else check_clip_norm(clip_norm)
        self.options = options
        self.owner = owner
        if noise_scale is not None and not isinstance(noise_scale, NoiseScale):
            raise ArgumentError(f"noise_scale must be a distclip.NoiseScale or None; got noise_scale={noise_scale!r}")
        if noise_scale is not None and options.compression == "fp16":
            raise ArgumentError("noise_scale with compression='fp16': the replicas' sums of squares would travel "
                                "as float16 and overflow; use compression=None")
        if noise_scale is not None and self.groups is not None:
            raise ArgumentError(f"clip_norm={clip_norm!r} with a noise_scale: the noise scale compares the "
                                "replicas' own gradients with their mean, which the groups scale group by group; "
                                "use one or the other")
        self.noise_scale = noise_scale
        if rewind is not None and not isinstance(rewind, Rewind):
            raise ArgumentError(f"rewind must be a distclip.Rewind or None; got rewind={rewind!r}")
        if skip_spikes is not None and not isinstance(skip_spikes, SkipSpikes):
            raise ArgumentError(f"skip_spikes must be a distclip.SkipSpikes or None; got skip_spikes={skip_spikes!r}")
        if rewind is not None and skip_spikes is not None:
            raise ArgumentError(f"rewind and skip_spikes are two answers to one spike detector; pass one; got "
                                f"rewind={rewind!r} and skip_spikes={skip_spikes!r}")
        detector = rewind or skip_spikes
        if detector is not None and options.nonfinite != "skip":
            name = "rewind" if rewind is not None else "skip_spikes"
            raise ArgumentError(f"{name} needs nonfinite='skip' (it skips updates in lockstep); "
                                f"got nonfinite={options.nonfinite!r}")
        if rewind is not None and rewind.reset_moments:
            internals.moment_slot_names(self.stepper)  # refuses an optimizer without moment slots, by name
        self.rewind = rewind
        if agc is not None and not isinstance(agc, AGC):
            raise ArgumentError(f"agc must be a distclip.AGC or None; got agc={agc!r}")
        if agc is not None and noise_scale is not None:
            raise ArgumentError(f"agc={agc!r} with a noise_scale: the noise scale compares the replicas' own "
                                "gradients with their mean, which AGC changes unit by unit; use one or the other")
        self.agc = agc
        self.strategy = tf.distribute.get_strategy()
        steps = options.accumulation_steps
        self.accumulation = Accumulation(steps, loss=detector is not None) if steps > 1 else None
        self.state = StepState(make_variable, noise_scale, 0 if self.groups is None else len(self.groups.names))
        self.threshold = Threshold(clip_norm if self.groups is None else self.groups.global_clip_norm, make_variable)
        self.rewinding = None if detector is None else Rewinding(detector)

    def saved_state(self) -> List[Any]:
        """distclip's own variables that a rewind restores: the policy's, the skip count, the noise scale's."""
        noise = self.state.noise
        return [*self.threshold.state.values(), self.state.skipped_steps,
                *([] if noise is None else [noise.gradient_squared, noise.trace, noise.updates])]

    def ensure_built(self, variables: Sequence[Any], present: Optional[Sequence[bool]] = None) -> None:
        """Checks `variables`, creates the optimizer's variables and the accumulators if not yet created,
        then checks that the optimizer was built for `variables`.

        `present` marks the variables that receive gradients (accumulators are made for those only).
        """
        if self.agc is not None:
            for v in variables:
                unit_axes(v)  # refuses a variable AGC has no units for, before anything is created
        if self.groups is not None:
            self.groups.members(variables)  # refuses a variable in two groups, or an empty group, likewise
        ensure_built(self.optimizer, self.stepper, variables)
        self.create_vectors(variables)
        if self.accumulation is not None:
            self.accumulation.create(list(variables), present)

    def create_vectors(self, variables: Sequence[Any]) -> None:
        """Makes the state's per-replica and per-variable variables, and the rewind's ring, once (with the
        optimizer built)."""
        replicas = sync.replicas(self.options.backend)
        if self.noise_scale is not None:  # before anything is created: when building, not at the first step
            check_replicas(replicas, self.noise_scale)
        self.state.create_vectors(self.strategy, replicas, len(variables), self.options.variable_norms)
        if self.rewinding is not None:
            moments = internals.moment_slots(self.stepper) if self.rewind is not None and self.rewind.reset_moments \
                else []
            self.rewinding.create_ring(
                self.strategy, owned_variables(variables, self.optimizer.variables, self.saved_state()), moments)

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches accumulated but not yet applied (0 without accumulation); a checkpoint needs 0."""
        return 0 if self.accumulation is None else self.accumulation.pending()

    @property
    def applies_next(self) -> bool:
        """Whether the next `apply` takes an update (always, without accumulation)."""
        return self.pending_micro_batches + 1 == self.options.accumulation_steps

    def apply(self, grads: Sequence[Any], variables: Sequence[Any], loss: Optional[Any] = None) -> ClipResult:
        """Checks the call, builds what is missing, then runs `step` (every k-th call when accumulating)."""
        grads, variables = check_pairs(grads, variables)
        if loss is not None:
            loss = tf.convert_to_tensor(loss)
            if loss.shape.rank != 0 or not loss.dtype.is_floating:
                raise ArgumentError(f"loss must be a float scalar (this replica's loss); got loss={loss!r}")
        sync.check_replica_context(f"{self.owner}.apply")
        check_strategy(self.stepper, self.strategy, self.owner)
        self.ensure_built(variables, [g is not None for g in grads])
        if self.accumulation is None:
            return self.step(grads, variables, loss)
        ran = self.accumulation.run(grads, lambda sums, loss_sum: self.step(sums, variables, loss_sum), loss)
        with tf.control_dependencies([ran]):
            return self.state.latest(len(grads))

    def step(self, grads: List[Any], variables: List[Any], loss: Optional[tf.Tensor] = None) -> ClipResult:
        """One update: reduce, measure, decide, scale (`clip_synchronized`), then apply and record."""
        loss_scale = None if self.lso is None else tf.cast(tf.convert_to_tensor(tf_variable(self.lso.dynamic_scale)),
                                                           tf.float32)
        backend = sync.select(self.options.backend)
        replicas = backend.num_replicas()
        if replicas != self.state.nonfinite_replicas.shape[0]:
            raise ContextError(f"{self.owner} was built for {self.state.nonfinite_replicas.shape[0]} replicas and "
                               f"now runs on {replicas}: create it under the strategy (or Horovod) it runs under")
        if self.noise_scale is not None:
            check_replicas(replicas, self.noise_scale)
        plan = None if self.groups is None else GroupPlan(self.groups.members(variables),
                                                          self.groups.thresholds(self.stepper.iterations))
        result, threshold, replica_squares = clip_synchronized(
            grads, backend, self.threshold.at(self.stepper.iterations), self.options,
            micro_batches=self.options.accumulation_steps, loss_scale=loss_scale, loss=loss, agc=self.agc,
            weights=variables, groups=plan)
        if self.state.noise is not None and replica_squares is None:
            raise ArgumentError("noise_scale needs float32 or float64 gradients on the wire; these travel as "
                                "float16, whose sums of squares overflow")
        if self.rewinding is not None:
            return self.take(result, threshold, replica_squares, replicas, variables, plan)
        # Nothing is written before every check of this step has passed: the
        # threshold's and, with nonfinite="raise", the norm's (both feed `scale`).
        with tf.control_dependencies([result.scale]):
            ok = tf.identity(result.finite)
            self.state.record(result, threshold, None if plan is None else plan.thresholds)
            if self.state.noise is not None:
                result = result._replace(
                    noise=self.state.noise.record(result.global_norm, replica_squares, replicas, result.finite))
            for var, value in () if self.lso is None else _next_loss_scale(self.lso, result.finite):
                var.assign(value)
        apply_in_lockstep(
            self.stepper, result.grads, variables, ok, skip=skips(self.options.nonfinite),
            assign_on_apply=self.threshold.updates(result.global_norm, result.finite),
            count_skip=self.state.skipped_steps)
        return result

    def take(self, result: ClipResult, threshold: tf.Tensor, replica_squares: Optional[tf.Tensor], replicas: int,
             variables: List[Any], plan: Optional[GroupPlan] = None) -> ClipResult:
        """With `rewind` or `skip_spikes`: `step` after the clip, as one of five actions taken on every replica
        together (`skip_spikes` takes three: APPLY, NONFINITE, SKIP).

        The action comes from the synchronized norm and loss (`Rewinding.action`);
        what the plain step always writes (the policy's and the loss scale's next
        values, the noise scale's averages) is written only by the actions that
        take the update in (APPLY, NONFINITE), so a skipped update leaves no trace.
        """
        rewinding = self.rewinding
        assert rewinding is not None
        with tf.control_dependencies([result.scale]):
            self.state.record(result, threshold, None if plan is None else plan.thresholds)
            action = tf.cast(rewinding.action(result.global_norm, result.finite, result.loss), tf.int32)
        pairs = [(g, v) for g, v in zip(result.grads, variables, strict=True) if g is not None]
        targets = [v for _, v in pairs]
        policy = self.threshold.updates(result.global_norm, result.finite)
        next_scale = [] if self.lso is None else _next_loss_scale(self.lso, result.finite)
        noise = self.state.noise

        def assign(pairs, values) -> None:
            for (var, _), value in zip(pairs, values, strict=True):
                var.assign(value)

        def apply_update(grads, policy_values, scale_values, norm, squares, loss) -> None:
            rewinding.before_apply()
            factor = rewinding.lr_factor()
            with no_second_reduction(self.stepper), contextlib.nullcontext() if factor is None else \
                    internals.learning_rate_times(self.stepper, factor):
                self.stepper.apply(grads, targets)
            assign(policy, policy_values)
            assign(next_scale, scale_values)
            if noise is not None:
                noise.record(norm, squares, replicas, tf.constant(True))
            rewinding.after_apply(norm, loss)

        def nonfinite(grads, policy_values, scale_values, *_) -> None:
            self.state.skipped_steps.assign_add(tf.ones([], tf.int64))
            assign(next_scale, scale_values)
            rewinding.after_nonfinite()

        args = ([g for g, _ in pairs], [v for _, v in policy], [v for _, v in next_scale], result.global_norm,
                replica_squares, result.loss)
        def skip(grads, policy_values, scale_values, norm, squares, loss) -> None:
            rewinding.skip_one(norm, loss)

        branches = [apply_update, nonfinite, skip]
        if rewinding.rewinds_on_spike:
            branches += [lambda *_: rewinding.rewind(stop=False), lambda *_: rewinding.rewind(stop=True)]
        done = run_switch(action, branches, args)
        with tf.control_dependencies([done]):
            return result._replace(noise=None if noise is None else noise.latest())


def _next_loss_scale(lso: Any, finite: tf.Tensor) -> List[Tuple[Any, tf.Tensor]]:
    """(variable, value) pairs for the loss scale and its counter after a step; `finite` is identical everywhere.

    Finite: the counter grows, and after `dynamic_growth_steps` finite steps in a
    row the scale doubles; not finite: the scale halves and the counter restarts.
    """
    counter = tf.convert_to_tensor(lso.step_counter.value)
    scale = tf.convert_to_tensor(lso.dynamic_scale.value)
    grow = tf.equal(counter, tf.cast(lso.dynamic_growth_steps - 1, counter.dtype))
    new_counter = tf.where(finite, tf.where(grow, tf.zeros_like(counter), counter + 1), tf.zeros_like(counter))
    new_scale = tf.where(finite, tf.where(grow, scale * 2.0, scale), scale * 0.5)
    return [(lso.step_counter, new_counter), (lso.dynamic_scale, new_scale)]
