"""`ClipOptimizer`: the synchronized clip step as a Keras 3 optimizer, for `model.compile` / `model.fit`."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, NoReturn, Optional

import keras

from distclip._src import internals
from distclip._src.clip import ClipResult
from distclip._src.errors import ArgumentError
from distclip._src.groups import deserialize_clip_norm, serialize_clip_norm
from distclip._src.keras import multiworker_fit
from distclip._src.lockstep import create_variables
from distclip._src.noise import NoiseScale
from distclip._src.agc import AGC
from distclip._src.rewind import Rewind, SkipSpikes
from distclip._src.optimizer import optimizers_in
from distclip._src.base import StepBase
from distclip._src.update import ClipUpdate


class _InnerConfig:
    """A configuration name of the optimizer that updates, as `LossScaleOptimizer` forwards `learning_rate`:
    read from `inner_optimizer` and set on it.

    The wrapper's own value is used only before `inner_optimizer` is set
    (Keras's `__init__` sets its defaults) and while Keras's `build` runs for
    the wrapper (it reads `use_ema` and `gradient_accumulation_steps` to
    decide what to create for the wrapper itself, which must be nothing).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, wrapper: Any, owner: Optional[type] = None) -> Any:
        if wrapper is None:
            return self
        if _forwards(wrapper):
            return getattr(wrapper.inner_optimizer, self.name)
        return wrapper.__dict__.get("_own_config", {}).get(self.name)

    def __set__(self, wrapper: Any, value: Any) -> None:
        if _forwards(wrapper):
            setattr(wrapper.inner_optimizer, self.name, value)
        else:
            wrapper.__dict__.setdefault("_own_config", {})[self.name] = value


def _forwards(wrapper: Any) -> bool:
    return "inner_optimizer" in wrapper.__dict__ and not wrapper.__dict__.get("_building", False)


@keras.saving.register_keras_serializable(package="distclip")
class ClipOptimizer(StepBase, keras.optimizers.Optimizer):
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
        callable of the step, a policy (`distclip.AutoClip`,
        `distclip.SpikeClip`, `distclip.ZClip`) whose state is kept in this
        optimizer's variables (saved with it), or a threshold per group of
        variables (`distclip.ClipGroups`; saved with its listed variables as
        their paths).
      nonfinite: as for `distclip.ClipStep` ("skip": `iterations` stays as it was too).
      reduction: as for `distclip.ClipStep`.
      backend: as for `distclip.ClipStep`.
      sparse_as_dense: as for `distclip.ClipStep`.
      compression: as for `distclip.ClipStep`.
      accumulation_steps: as for `distclip.ClipStep` (`iterations` counts the updates).
      bucket_mb: as for `distclip.ClipStep`.
      variable_norms: as for `distclip.ClipStep`.
      noise_scale: as for `distclip.ClipStep`.
      rewind: as for `distclip.ClipStep`.
      agc: as for `distclip.ClipStep`.
      skip_spikes: as for `distclip.ClipStep` (`iterations` stays as it was on a skipped spike too).
      name: the optimizer's name (None: "clip_optimizer").

    Raises:
      ArgumentError: a bad argument, named with its value.
    """

    _distclip_wrapper = True  # refused as the optimizer of another distclip step

    def _start(self, optimizer: Any, name: Optional[str]) -> Any:
        if isinstance(optimizer, dict):
            optimizer = keras.saving.deserialize_keras_object(optimizer)
        keras.optimizers.Optimizer.__init__(self, learning_rate=0.0, name=name or "clip_optimizer")
        return optimizer

    def _create_update(self, optimizer: Any) -> ClipUpdate:
        update = ClipUpdate(optimizer, self.clip_norm, self.options, "ClipOptimizer", self._state_variable,
                            self.noise_scale, self.rewind, self.agc, self.skip_spikes)
        self.inner_optimizer = optimizer
        self.accumulation = update.accumulation
        if update.rewinding is not None:
            self.rewinding = update.rewinding  # tracked: saved by tf.train.Checkpoint
        multiworker_fit.install_under(internals.optimizer_strategy(self))
        return update

    # The inner optimizer's configuration, read from it and set on it.
    weight_decay = _InnerConfig()
    clipnorm = _InnerConfig()
    clipvalue = _InnerConfig()
    global_clipnorm = _InnerConfig()
    use_ema = _InnerConfig()
    ema_momentum = _InnerConfig()
    ema_overwrite_frequency = _InnerConfig()
    gradient_accumulation_steps = _InnerConfig()


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
            with internals.optimizer_strategy(self).scope():
                self._update.ensure_built(var_list)  # checks the variables before anything is created
                self.__dict__["_building"] = True  # Keras's build reads the wrapper's own use_ema, ...
                try:
                    super(ClipOptimizer, self).build(var_list)
                finally:
                    self.__dict__["_building"] = False

        create_variables(create, reads=var_list)

    def _state_variable(self, name, shape, dtype, initial):
        return self.add_variable(
            shape, initializer=keras.initializers.Constant(initial), dtype=dtype.name, aggregation="none", name=name)

    @property
    def skipped_steps(self) -> Any:
        """The int64 variable counting the steps skipped because the synchronized global norm was not finite."""
        return self._update.state.skipped_steps

    @property
    def variables(self) -> List[Any]:
        return internals.own_variables(self) + self.inner_optimizer.variables

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

    def __setattr__(self, name: str, value: Any) -> None:
        # Only to refuse a LossScaleOptimizer around this one, which sets our loss_scale_factor to None once we
        # exist. A property setter would never see it: Keras's KerasAutoTrackable.__setattr__ returns early
        # when the attribute already `is` the value (None is None).
        if name == "loss_scale_factor" and "inner_optimizer" in self.__dict__:
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
            trainable_variables = internals.built_variables(self)
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
        try:
            clip_norm = serialize_clip_norm(self.clip_norm)
        except NotImplementedError as e:
            raise NotImplementedError(f"ClipOptimizer.get_config: {e}, to save the optimizer with the model") \
                from None
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "clip_norm": clip_norm,
            **self.options.as_dict(),
            "noise_scale": None if self.noise_scale is None else dataclasses.asdict(self.noise_scale),
            "rewind": None if self.rewind is None else dataclasses.asdict(self.rewind),
            "agc": None if self.agc is None else dataclasses.asdict(self.agc),
            "skip_spikes": None if self.skip_spikes is None else dataclasses.asdict(self.skip_spikes),
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
        clip_norm = deserialize_clip_norm(config.pop("clip_norm"), custom_objects)
        if isinstance(config.get("noise_scale"), dict):
            config["noise_scale"] = NoiseScale(**config["noise_scale"])
        if isinstance(config.get("rewind"), dict):
            config["rewind"] = Rewind(**config["rewind"])
        if isinstance(config.get("skip_spikes"), dict):
            config["skip_spikes"] = SkipSpikes(**config["skip_spikes"])
        if isinstance(config.get("agc"), dict):
            config["agc"] = AGC(**config["agc"])
        return cls(optimizer, clip_norm, **config)
