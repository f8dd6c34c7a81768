"""`ClipStep`: synchronize once, clip, and apply the update with a Keras 3 optimizer once."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Tuple

import tensorflow as tf

from distclip._src.checks import split_pairs
from distclip._src.clip import ClipResult
from distclip._src.base import StepBase
from distclip._src.update import ClipUpdate
from distclip._src.variables import identical_variable


class ClipStep(StepBase, tf.Module):
    """A training step's gradient path: all-reduce, global-norm clip, one optimizer update.

    `distclip.keras.ClipOptimizer` takes the same options, documented here.

    Create it under the strategy's scope, like the model and the optimizer, and
    call `apply` inside `strategy.run` (or with no strategy):

        with strategy.scope():
            model = ...
            optimizer = keras.optimizers.Adam(1e-3)
            clip = distclip.ClipStep(optimizer, clip_norm=1.0)
            clip.build(model.trainable_variables)  # optional: else the first step creates the state

        @tf.function
        def train_step(x, y):
            def replica_fn(x, y):
                with tf.GradientTape() as tape:
                    loss = tf.nn.compute_average_loss(loss_fn(y, model(x)), global_batch_size=B)
                grads = tape.gradient(loss, model.trainable_variables)
                return clip.apply(grads, model.trainable_variables)
            return strategy.run(replica_fn, args=(x, y))

    Per step: the gradients are reduced across replicas in one packed collective,
    `scale = min(1, clip_norm / global_norm)` is applied, and the optimizer's
    own `apply` takes the step, once, with no second reduction (see
    `distclip._src.update`).

    A policy's state is kept in this module's variables (`policy_state`, saved
    by `tf.train.Checkpoint`) and updated from the synchronized norm,
    identically on every replica.

    Args:
      optimizer: the Keras 3 optimizer that takes the steps (created under the
        same scope), without its own `clipnorm`/`clipvalue`/`global_clipnorm`.
        It may be a `keras.optimizers.LossScaleOptimizer` (mixed precision;
        scale the loss with `optimizer.scale_loss`): the norm is that of the
        unscaled gradients, one multiply unscales and clips, and an overflow
        anywhere skips the step and halves the scale on every replica.
      clip_norm: a number, a scalar tensor or variable, a callable of the
        optimizer's iteration count (a Keras `LearningRateSchedule` works), a
        policy (`distclip.AutoClip`, `distclip.SpikeClip`, `distclip.ZClip`),
        a threshold per group of variables (`distclip.ClipGroups`: each group
        clipped by its own synchronized norm, then an optional global
        threshold on top), or None: never clip (the step synchronizes and
        applies, and still reports the norm, as a baseline run to compare).
      nonfinite: "skip" (default): when the synchronized norm is inf or NaN,
        every replica skips the step together; variables, optimizer slots and
        `optimizer.iterations` stay as they were and `skipped_steps` grows by
        one. "raise" fails the step instead; "propagate" applies NaN
        gradients, as `tf.clip_by_global_norm` followed by `optimizer.apply`
        would.
      reduction: "auto" (SUM under tf.distribute, where per-replica losses are
        divided by the global batch; MEAN under Horovod), "sum" or "mean".
      backend: what synchronizes the gradients: "auto" (found from the
        context; under Horovod each process is one replica), "tf_distribute",
        "horovod" or "none" (taken as synchronized).
      sparse_as_dense: send `tf.IndexedSlices` as dense tensors in the packed
        all-reduce instead of all-gathering them.
      compression: None or "fp16": float32/float64 gradients travel as float16;
        the norm is computed on the decompressed values.
      accumulation_steps: k, 1 to 2**31 - 1. Each call adds this replica's gradients to
        local sums; every k-th call reduces them once, clips their mean and
        applies it (one step on a k-times-larger batch); `apply` then returns
        the latest update's result, with `grads` of `None`.
      bucket_mb: "auto" (25 MB buckets under Horovod; one packed all-reduce
        under tf.distribute), None (one packed all-reduce after the backward
        pass), or buckets of at most this many megabytes, last layers first,
        each sent as soon as it is ready.
      variable_norms: also measure each synchronized gradient's own L2 norm
        (`ClipResult.variable_norms`, and the `variable_norms` state that
        `ClipLogger` writes per layer): one float per variable, no collective.
      noise_scale: a `distclip.NoiseScale` to estimate the gradient noise
        scale at every update (`ClipResult.noise`; needs 2 or more replicas),
        or None. Not with `agc` or `ClipGroups`, which change the gradients
        unit by unit or group by group.
      rewind: a `distclip.Rewind` to rewind to an in-memory snapshot and skip
        updates when the norm (or the loss given to `apply`) spikes, on every
        replica together; or None. Needs `nonfinite="skip"`.
      agc: a `distclip.AGC` to clip each unit of the synchronized gradients
        against its weights before the global clip (adaptive gradient
        clipping, Brock et al., 2021), or None. With `clip_norm=None` it is
        the only clipping; with `ClipGroups`, the groups clip what AGC left.
      skip_spikes: a `distclip.SkipSpikes` to skip an update whose norm (or
        the loss given to `apply`) is a spike, on every replica together,
        without going back (`skipped_spikes` counts them); or None. Not with
        `rewind` (one detector, one answer). Needs `nonfinite="skip"`.
      name: the module's name and its variables' name scope (None: "clip_step").

    Raises:
      ArgumentError: a bad argument, named with its value.
    """

    def _start(self, optimizer: Any, name: Optional[str]) -> Any:
        tf.Module.__init__(self, name=name or "clip_step")
        return optimizer

    def _create_update(self, optimizer: Any) -> ClipUpdate:
        with tf.name_scope(self.name):
            update = ClipUpdate(optimizer, self.clip_norm, self.options, "ClipStep", identical_variable,
                                self.noise_scale, self.rewind, self.agc, self.skip_spikes)
        self.optimizer = optimizer
        #: Steps skipped because the synchronized global norm was not finite.
        self.skipped_steps = update.state.skipped_steps
        self.accumulation = update.accumulation
        #: The policy's state variables by name (empty unless `clip_norm` is a policy).
        self.policy_state = update.threshold.state
        noise = update.state.noise
        #: The noise scale's moving averages by name (empty without a `noise_scale`), saved with the step.
        self.noise_state = {} if noise is None else {
            "gradient_squared": noise.gradient_squared, "trace": noise.trace, "updates": noise.updates}
        #: The rewind's ring, window and counters (None without `rewind` or `skip_spikes`), saved with the step.
        self.rewinding = update.rewinding
        return update

    def build(self, trainable_variables: Sequence[Any]) -> None:
        """Creates the optimizer's variables, the accumulators and the step's per-variable state now.

        Otherwise the first `apply` creates them, and `tf.function` then traces
        the step that created them twice (as for a Keras optimizer built on its
        first `apply`): call it under the strategy's scope before the first step.

        Args:
          trainable_variables: the variables the steps will update.

        Raises:
          ArgumentError: a variable the optimizer cannot update (named), or
            one the optimizer was not built for.
        """
        self._update.ensure_built(trainable_variables)

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any], loss: Optional[Any] = None) -> ClipResult:
        """Synchronizes `grads`, clips them by their global norm and applies them to `trainable_variables`.

        Call it inside `strategy.run` (or with no strategy), eagerly or in a
        `tf.function`. Per update, on every replica:

            g_i   <- sum (tf.distribute) or mean (Horovod) of g_i over replicas
            scale  = min(1, clip_norm / sqrt(sum_i ||g_i||_2^2))
            optimizer.apply([g_i * scale], trainable_variables)

        Args:
          grads: this replica's gradients, one per variable (`None` for a
            variable that received none; `tf.IndexedSlices` stay sparse).
          trainable_variables: the variables, in the order of `grads`.
          loss: this replica's loss (a float scalar, before any loss scaling),
            or None. It rides on the packed all-reduce (one element) and comes
            back reduced as the gradients are (`ClipResult.loss`); with
            `rewind`, spikes in it rewind too (with `skip_spikes`, are skipped).

        Returns:
          The synchronized, clipped gradients with the norm and scale; with
          accumulation, the latest update's result with `grads` of `None`.

        Raises:
          ArgumentError: gradients and variables that do not match, named.
          ContextError: called in a cross-replica context, or under another
            strategy than the one this step was created under.
        """
        return self._update.apply(grads, trainable_variables, loss)

    def apply_gradients(self, grads_and_vars: Iterable[Tuple[Any, Any]]) -> ClipResult:
        """`apply` for `(gradient, variable)` pairs, as Keras 2's `optimizer.apply_gradients` took them.

        Args:
          grads_and_vars: `(gradient, variable)` pairs.

        Returns:
          What `apply` returns.
        """
        grads, variables = split_pairs(grads_and_vars)
        return self.apply(grads, variables)
