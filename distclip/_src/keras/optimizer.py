"""`ClipOptimizer`: the synchronized clip step as a Keras 3 optimizer, for `model.compile` / `model.fit`."""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Dict, List, NoReturn, Optional, Union

import keras

from distclip._src.clip import ClipResult
from distclip._src.errors import ArgumentError
from distclip._src.keras import multiworker_fit
from distclip._src.lockstep import create_variables
from distclip._src.noise import NoiseScale
from distclip._src.rewind import Rewind
from distclip._src.nonfinite import Nonfinite
from distclip._src.optimizer import optimizers_in
from distclip._src.options import BucketMB, StepOptions
from distclip._src.policies import Policy
from distclip._src.sync import BackendName, Reduction
from distclip._src.sync.wire import Compression
from distclip._src.threshold import ClipNorm
from distclip._src.update import ClipUpdate, Diagnostics


#: The configuration of the optimizer that updates: read from `inner_optimizer` and set on it, never the
#: wrapper's own (which Keras's base class keeps at its defaults for its own use while building).
INNER_CONFIG = frozenset({"weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
                          "ema_overwrite_frequency", "gradient_accumulation_steps"})


@keras.saving.register_keras_serializable(package="distclip")
class ClipOptimizer(Diagnostics, keras.optimizers.Optimizer):
    """Wraps a Keras 3 optimizer so that `model.fit` clips the synchronized gradients.

        model.compile(optimizer=distclip.keras.ClipOptimizer(keras.optimizers.Adam(1e-3), clip_norm=1.0),
                      loss=..., metrics=[...])

    Each step (under the default strategy, MirroredStrategy,
    MultiWorkerMirroredStrategy, TPUStrategy, or Horovod with one process per
    replica), with `g_i` the gradients summed (tf.distribute) or averaged
    (Horovod) across replicas in one packed all-reduce:

        global_norm = sqrt(sum_i ||g_i||_2^2)
        g_i        <- g_i * min(1, clip_norm / global_norm)

    then the optimizer's own `apply`, once, with no second reduction.
    This is single-device training on the global batch with `global_clipnorm`.
    Keras's own `global_clipnorm` under a strategy clips each replica's
    gradients before they are reduced, which is not.

    Mixed precision ("mixed_float16"): wrap the optimizer in Keras's
    `LossScaleOptimizer` and that in `ClipOptimizer`, and compile with
    `auto_scale_loss=False` (compile would otherwise wrap this optimizer in one
    more LossScaleOptimizer, which is refused with an error saying so):

        ClipOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), clip_norm=1.0)

    `fit` scales the loss by the dynamic scale S; the synchronized gradients'
    norm is that of the unscaled gradients, finiteness is decided on it (so
    every replica agrees), one multiply by `scale / S` unscales and clips, and
    S halves after an overflow and doubles after `dynamic_growth_steps` finite
    steps, identically on every replica. "mixed_bfloat16" needs no loss scale.

    Created under a multi-worker MultiWorkerMirroredStrategy, it makes Keras's
    own `fit` work there (`distclip.keras.fix_multiworker_fit`).

    The wrapper answers for the optimizer it wraps: `iterations`, `learning_rate`,
    the configuration (`weight_decay`, `clipnorm`, `clipvalue`,
    `global_clipnorm`, `use_ema`, `ema_momentum`, `ema_overwrite_frequency`,
    `gradient_accumulation_steps`: read from it, set on it), `scale_loss`,
    `finalize_variable_values` and any public name the wrapper does not have
    (`beta_1`, Muon's `lr_adjust`, ...) are the inner optimizer's;
    `exclude_from_weight_decay` goes to every optimizer that updates (through a
    `LossScaleOptimizer` or `MultiOptimizer`). `update_step` and
    `stateless_apply` raise an error saying what to call instead.

    Each step leaves what it saw in variables, identical on every replica:
    `global_norm` (before clipping), `clip_norm_used` (the threshold used),
    `clip_scale` and `skipped_steps` (skipped since the start).
    `distclip.keras.ClipLogger` puts them in `fit`'s logs (progress bar,
    `History`) and, given a `log_dir`, in TensorBoard and a CSV.

    Args:
      optimizer: the Keras 3 optimizer that takes the steps, without its own
        `clipnorm`/`clipvalue`/`global_clipnorm` (or its config, as a dict).
      clip_norm: threshold in units of the global norm: None (no clipping), a
        positive number, a `keras.optimizers.schedules.LearningRateSchedule` or
        callable of the step, or a policy (`distclip.AutoClip`,
        `distclip.SpikeClip`) whose state is kept in this optimizer's
        variables (saved with it).
      nonfinite: "skip" (default): when the synchronized norm is inf or NaN,
        every replica skips the step together (the variables, the optimizer's
        slots and `iterations` stay as they were); "raise" fails the step;
        "propagate" applies the NaN gradients.
      reduction: "auto" (SUM under tf.distribute; MEAN under Horovod), "sum"
        or "mean".
      backend: "auto" (found from the context), "tf_distribute", "horovod" or
        "none".
      sparse_as_dense: send `tf.IndexedSlices` as dense tensors in the packed
        all-reduce instead of all-gathering them.
      compression: None or "fp16": float32/float64 gradients travel as float16.
      accumulation_steps: k, 1 to 2**31 - 1: every k-th call reduces the local sums of k
        micro-batches' gradients once, clips their mean and applies it
        (`iterations` counts the updates).
      bucket_mb: "auto", None or a size in megabytes, as for
        `distclip.sync_and_clip`.
      variable_norms: also measure each synchronized gradient's own L2 norm
        (`ClipResult.variable_norms`, and the `variable_norms` state that
        `ClipLogger` writes per layer): one float per variable, no collective.
      noise_scale: a `distclip.NoiseScale` to estimate the gradient noise
        scale at every update (`ClipResult.noise`; needs 2 or more replicas),
        or None.
      rewind: a `distclip.Rewind` to rewind to an in-memory snapshot and skip
        updates when the norm (or the loss given to `apply`) spikes, on every
        replica together; or None. Needs `nonfinite="skip"`.
      name: the optimizer's name.

    Raises:
      ArgumentError: a bad argument, named with its value.
    """

    _distclip_wrapper = True  # refused as the optimizer of another distclip step

    def __init__(self, optimizer: Union[keras.optimizers.Optimizer, Dict[str, Any]], clip_norm: ClipNorm, *,
                 nonfinite: Nonfinite = "skip", reduction: Reduction = "auto", backend: BackendName = "auto",
                 sparse_as_dense: bool = False, compression: Compression = None, accumulation_steps: int = 1,
                 bucket_mb: BucketMB = "auto", variable_norms: bool = False,
                 noise_scale: Optional[NoiseScale] = None, rewind: Optional[Rewind] = None,
                 name: Optional[str] = None) -> None:
        if isinstance(optimizer, dict):
            optimizer = keras.saving.deserialize_keras_object(optimizer)
        options = StepOptions(nonfinite=nonfinite, reduction=reduction, backend=backend,
                              sparse_as_dense=sparse_as_dense, compression=compression,
                              accumulation_steps=accumulation_steps, bucket_mb=bucket_mb,
                                   variable_norms=variable_norms)
        update = ClipUpdate(optimizer, clip_norm, options, "ClipOptimizer", noise_scale, rewind)
        super().__init__(learning_rate=0.0, name=name or "clip_optimizer")
        self.options = options
        self.inner_optimizer = optimizer
        self.clip_norm = clip_norm
        self.noise_scale = noise_scale
        self.rewind = rewind
        self._update = update
        self.accumulation = update.accumulation
        self.__dict__["_complete"] = True
        multiworker_fit.install_under(self._distribution_strategy)

    def __getattribute__(self, name: str) -> Any:
        if name in INNER_CONFIG:
            state = object.__getattribute__(self, "__dict__")
            if state.get("_complete") and not state.get("_building"):
                return getattr(state["inner_optimizer"], name)
        return super().__getattribute__(name)

    def __getattr__(self, name: str) -> Any:
        # Only for names the wrapper lacks: the inner optimizer's own public ones (beta_1, Muon's lr_adjust, ...).
        inner = self.__dict__.get("inner_optimizer")
        if name.startswith("_") or inner is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")
        return getattr(inner, name)

    def exclude_from_weight_decay(self, var_list: Optional[List[Any]] = None,
                                  var_names: Optional[List[str]] = None) -> None:
        """Excludes variables from weight decay in every optimizer that updates (Keras's own method on each).

        Args:
          var_list: variables to exclude.
          var_names: substrings; a variable whose name contains one is excluded.

        Raises:
          ValueError: from Keras, if an optimizer that updates is already built.
        """
        for opt in optimizers_in(self.inner_optimizer):
            if len(optimizers_in(opt)) == 1:  # it holds no other optimizer: it updates (not a LossScale/MultiOptimizer)
                opt.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> NoReturn:
        """Not available: the wrapper has no update of its own (the inner optimizer's runs inside `apply`).

        Args:
          gradient: unused.
          variable: unused.
          learning_rate: unused.

        Raises:
          NotImplementedError: always, saying to call `apply` or `apply_gradients`.
        """
        raise NotImplementedError(
            "ClipOptimizer.update_step: the wrapper has no update of its own; the inner optimizer's update_step "
            "runs inside ClipOptimizer.apply (call apply or apply_gradients), or call "
            "inner_optimizer.update_step to bypass the synchronized clip")

    def build(self, var_list: List[Any]) -> None:
        """Builds the inner optimizer's variables and the wrapper's own (norm, scale, policy state, accumulators).

        Args:
          var_list: the model's trainable variables.
        """
        if self.built:
            return

        def create():  # eagerly, once, under our strategy, wherever build is called from
            with self._distribution_strategy.scope():
                self._update.ensure_built(var_list)  # checks the variables before anything is created
                self._update.create_state(self._state_variable)
                self._update.create_vectors(var_list)
                if self._update.rewinding is not None:
                    self.rewinding = self._update.rewinding  # tracked: saved by tf.train.Checkpoint
                self.__dict__["_building"] = True  # Keras's build reads the wrapper's own use_ema, ...
                try:
                    super(ClipOptimizer, self).build(var_list)
                finally:
                    self.__dict__["_building"] = False

        create_variables(create, reads=var_list)

    def _state_variable(self, name, shape, dtype, initial):
        return self.add_variable(
            shape, initializer=keras.initializers.Constant(initial), dtype=dtype.name, aggregation="none", name=name)

    # What the latest update saw (see distclip._src.update.StepState); available once built.
    skipped_steps = property(lambda self: self._update.state.skipped_steps)
    # Accumulation (see ClipStep): checkpoints only when pending_micro_batches is 0.
    pending_micro_batches = property(lambda self: self._update.pending_micro_batches)
    applies_next = property(lambda self: self._update.applies_next)
    global_norm = property(lambda self: self._update.state.global_norm)
    clip_norm_used = property(lambda self: self._update.state.clip_norm)
    clip_scale = property(lambda self: self._update.state.clip_scale)

    @property
    def variables(self) -> List[Any]:
        return self._variables[:] + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        """The inner optimizer's `scale_loss`: the loss times the dynamic scale under a `LossScaleOptimizer`.

        Args:
          loss: the loss to scale.

        Returns:
          The scaled loss (the loss itself without a `LossScaleOptimizer`).
        """
        return self.inner_optimizer.scale_loss(loss)

    def __setattr__(self, name, value):
        if name in INNER_CONFIG and self.__dict__.get("_complete", False):
            setattr(self.inner_optimizer, name, value)
            return
        # A LossScaleOptimizer wrapping this one sets our loss_scale_factor once we exist.
        if name == "loss_scale_factor" and self.__dict__.get("_complete", False):
            raise ArgumentError(
                "a keras.optimizers.LossScaleOptimizer is wrapping a ClipOptimizer, which would decide overflows "
                "per replica, before the all-reduce. Put it inside instead: ClipOptimizer(LossScaleOptimizer(inner), "
                "clip_norm); under the 'mixed_float16' policy also pass model.compile(..., auto_scale_loss=False) so "
                "that compile does not wrap it again"
            )
        super().__setattr__(name, value)

    def finalize_variable_values(self, var_list: List[Any]) -> None:
        """The inner optimizer's `finalize_variable_values` (for example, its EMA weights at the end of `fit`).

        Args:
          var_list: the model's trainable variables.
        """
        self.inner_optimizer.finalize_variable_values(var_list)

    def apply(self, grads: List[Any], trainable_variables: Optional[List[Any]] = None,
              loss: Optional[Any] = None) -> ClipResult:
        """Synchronizes, clips and applies `grads`; call it in the replica context (as `fit` does).

        Args:
          grads: this replica's gradients, one per variable.
          trainable_variables: the variables, in the order of `grads`; the
            ones the optimizer was built for if omitted.
          loss: this replica's loss, as for `distclip.ClipStep.apply` (a
            `train_step` of your own can pass it; `fit`'s does not).

        Returns:
          What `distclip.ClipStep.apply` returns.

        Raises:
          ArgumentError: no variables for an optimizer not yet built, or
            gradients and variables that do not match.
        """
        if trainable_variables is None:
            if not self.built:
                raise ArgumentError("ClipOptimizer.apply: pass trainable_variables (the optimizer is not built yet)")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        self.build(trainable_variables)
        return self._update.apply(grads, trainable_variables, loss)

    def stateless_apply(self, optimizer_variables: Any, grads: Any, trainable_variables: Any) -> NoReturn:
        """Not available: the TensorFlow backend has no stateless apply.

        Args:
          optimizer_variables: unused.
          grads: unused.
          trainable_variables: unused.

        Raises:
          NotImplementedError: always, saying to call `apply`.
        """
        raise NotImplementedError("ClipOptimizer.stateless_apply: ClipOptimizer runs on the TensorFlow backend, "
                                  "which has no stateless_apply; call apply")

    def save_own_variables(self, store: Any) -> None:
        """Keras's saving (`model.save("x.keras")`): the optimizers' variables, then the rewind's state.

        Keras's own `save_own_variables` writes `self.variables` (the inner
        optimizer's and distclip's: policy, skip count, noise scale) under
        "0", "1", ...; with `rewind`, its counters, window and ring follow under
        "rewind_0", "rewind_1", ..., so a loaded model continues as the
        uninterrupted run would, a rewind included.

        Args:
          store: Keras's store for this optimizer.

        Raises:
          ArgumentError: micro-batches are accumulated but not applied (as for `tf.train.Checkpoint`).
        """
        if self.accumulation is not None:
            self.accumulation.check_no_pending()
        super().save_own_variables(store)
        for i, variable in enumerate(self._rewind_state()):
            store[f"rewind_{i}"] = variable.numpy()

    def load_own_variables(self, store: Any) -> None:
        """Keras's loading: what `save_own_variables` wrote, back into a built `ClipOptimizer`.

        A file without the rewind's state (written by distclip 0.2.0 or without
        `rewind`) loads with the rewind starting fresh, and a warning says so.

        Args:
          store: Keras's store for this optimizer.

        Raises:
          ValueError: the file's rewind state does not fit this optimizer's (another `Rewind`).
        """
        keys = list(store.keys())
        state = self._rewind_state()
        saved = sorted((k for k in keys if k.startswith("rewind_")), key=lambda k: int(k.split("_")[1]))
        if saved and len(saved) != len(state):  # checked before anything is assigned
            raise ValueError(f"{self.name}: the file holds {len(saved)} rewind variables, this optimizer's "
                             f"rewind={self.rewind!r} has {len(state)}")
        for key, variable in zip(saved, state, strict=True):
            if tuple(store[key].shape) != tuple(variable.shape):
                raise ValueError(f"{self.name}: the file's rewind state {key} has shape {tuple(store[key].shape)}, "
                                 f"this optimizer's rewind={self.rewind!r} needs {tuple(variable.shape)}")
        super().load_own_variables({k: store[k] for k in keys if not k.startswith("rewind_")})
        if state and not saved:
            warnings.warn(
                f"{self.name}: the file holds no rewind state (saved without rewind, or by distclip 0.2.0): the "
                "rewind starts fresh (empty ring and window, counters at 0), so this model may rewind where the "
                "run it was saved from would not", stacklevel=2)
        for key, variable in zip(saved, state, strict=True):
            variable.assign(store[key])

    def _rewind_state(self) -> List[Any]:
        rewinding = self._update.rewinding
        return [] if rewinding is None or not self.built else rewinding.state()

    def get_config(self) -> Dict[str, Any]:
        """The configuration that `from_config` rebuilds this optimizer from (saved in `.keras` files).

        Returns:
          The inner optimizer's serialized config, `clip_norm` (a policy or schedule serialized) and the options.
        """
        clip_norm = self.clip_norm
        if isinstance(clip_norm, (Policy, keras.optimizers.schedules.LearningRateSchedule)):
            clip_norm = keras.saving.serialize_keras_object(clip_norm)
        elif clip_norm is not None and not isinstance(clip_norm, numbers.Real):
            raise NotImplementedError(
                f"ClipOptimizer.get_config: clip_norm={clip_norm!r} cannot be saved; use a number, None, a "
                "LearningRateSchedule or a distclip policy to save the optimizer with the model"
            )
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "clip_norm": clip_norm,
            **self.options.as_dict(),
            "noise_scale": None if self.noise_scale is None else dataclasses.asdict(self.noise_scale),
            "rewind": None if self.rewind is None else dataclasses.asdict(self.rewind),
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects: Optional[Dict[str, Any]] = None) -> "ClipOptimizer":
        """Rebuilds a `ClipOptimizer` from `get_config`'s output.

        Args:
          config: what `get_config` returned.
          custom_objects: passed on to Keras's deserialization of the inner optimizer and `clip_norm`.

        Returns:
          A new, unbuilt `ClipOptimizer`.
        """
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        clip_norm = config.pop("clip_norm")
        if isinstance(clip_norm, dict):
            clip_norm = keras.saving.deserialize_keras_object(clip_norm, custom_objects=custom_objects)
        if isinstance(config.get("noise_scale"), dict):
            config["noise_scale"] = NoiseScale(**config["noise_scale"])
        if isinstance(config.get("rewind"), dict):
            config["rewind"] = Rewind(**config["rewind"])
        return cls(optimizer, clip_norm, **config)
