"""Clip thresholds: what `clip_norm` may be, checked, and turned into a float32 scalar.

A threshold is one of
  * None: no clipping (the step synchronizes and applies the gradients, and reports their norm);
  * a policy (`distclip.AutoClip`, `distclip.SpikeClip`, `distclip.ZClip`), whose state `Threshold` keeps;
  * a positive finite Python number (checked when it is given);
  * a scalar `tf.Tensor` or `tf.Variable` (checked when given if its value is
    known, and at every step otherwise, without a host sync);
  * a callable of the step number, e.g. a Keras `LearningRateSchedule`,
    evaluated at every step and checked like a tensor.
The threshold is in the units of the gradients' global L2 norm.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from distclip._src.checks import short_repr
from distclip._src.errors import ArgumentError
from distclip._src.norm import NO_CLIP
from distclip._src.policies import Policy
from distclip._src.variables import tf_variable

ClipNorm = Optional[Union[float, int, tf.Tensor, tf.Variable, Callable[[tf.Tensor], tf.Tensor]]]

_RULE = ("clip_norm must be a positive finite number, a scalar tensor or variable holding one, a callable of the step "
         "number, or None (no clipping)")


def _is_tensor_like(value) -> bool:
    return isinstance(value, (tf.Tensor, tf.Variable, keras.Variable, np.ndarray, np.generic)) or tf.is_tensor(value)


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _check_number(value: Any, shown: Any) -> None:
    """Positive and finite, also in float32, the dtype the threshold is used in; `shown` as the user gave it."""
    try:
        value = float(value)
    except OverflowError:
        raise ArgumentError(f"{_RULE}; got clip_norm={short_repr(shown)}, beyond any float") from None
    if not (math.isfinite(value) and value > 0):
        raise ArgumentError(f"{_RULE}; got clip_norm={short_repr(shown)}")
    with np.errstate(over="ignore", under="ignore"):
        in_float32 = float(np.float32(value))
    # Below float32's smallest normal number, TensorFlow's kernels flush a value to 0 (and then nothing trains).
    if in_float32 < _FLOAT32_TINY or math.isinf(in_float32):
        shown_32 = "inf" if math.isinf(in_float32) else "0 (below float32's smallest normal number, 1.2e-38)"
        raise ArgumentError(f"{_RULE} in float32, the dtype it is used in; got clip_norm={short_repr(shown)}, "
                            f"which is {shown_32} in float32")


def check_clip_norm(clip_norm: ClipNorm) -> ClipNorm:
    """Returns `clip_norm` unchanged if it is a valid threshold; raises `ArgumentError` naming it otherwise."""
    if clip_norm is None:
        return None
    if isinstance(clip_norm, bool) or isinstance(clip_norm, str):
        raise ArgumentError(f"{_RULE}; got clip_norm={short_repr(clip_norm)}")
    if isinstance(clip_norm, numbers.Real):
        _check_number(clip_norm, clip_norm)
        return clip_norm
    if _is_tensor_like(clip_norm):
        tensor: Any = clip_norm
        dtype = tf.as_dtype(tensor.dtype)
        if not (dtype.is_floating or dtype.is_integer) or dtype == tf.bool:
            raise ArgumentError(f"{_RULE}; got clip_norm of dtype {dtype.name}: {short_repr(clip_norm)}")
        if tf.TensorShape(tensor.shape).rank not in (None, 0):
            raise ArgumentError(f"{_RULE}; got clip_norm of shape {tensor.shape}: {short_repr(clip_norm)}")
        value = _static_value(clip_norm)
        if value is not None:
            _check_number(value, value)
        return clip_norm
    if callable(clip_norm):
        return clip_norm
    raise ArgumentError(f"{_RULE}; got clip_norm={short_repr(clip_norm)} of type {type(clip_norm).__name__}")


def _static_value(value) -> Optional[float]:
    """The value of `value` if it is known without running a graph, else None."""
    if isinstance(value, (np.ndarray, np.generic)):
        return float(value)
    if isinstance(value, (tf.Variable, keras.Variable)):
        return float(np.asarray(value.numpy())) if tf.executing_eagerly() else None
    if tf.is_tensor(value):
        static = tf.get_static_value(value)
        return None if static is None else float(static)
    return None


def resolve_clip_norm(clip_norm: ClipNorm, step: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The threshold for this step as a float32 scalar tensor.

    `clip_norm` is checked first (`check_clip_norm`). A tensor, variable or
    schedule value is checked again as it is now: eagerly it raises `ArgumentError`; in a graph
    it adds an assertion the rest of the step depends on, so an invalid
    threshold fails the step before anything is applied (XLA drops assertions).
    """
    check_clip_norm(clip_norm)
    if clip_norm is None:
        return tf.constant(NO_CLIP, tf.float32)
    if isinstance(clip_norm, numbers.Real) and not isinstance(clip_norm, bool):
        return tf.constant(float(clip_norm), tf.float32)
    if callable(clip_norm) and not _is_tensor_like(clip_norm):
        if step is None:
            raise ArgumentError(
                f"clip_norm is a schedule ({clip_norm!r}); pass step= (e.g. optimizer.iterations) "
                "or use ClipStep, which passes the optimizer's iteration count"
            )
        value = clip_norm(step)
    else:
        value = clip_norm
    value = tf.cast(tf.convert_to_tensor(tf_variable(value)), tf.float32)
    if value.shape.rank not in (None, 0):
        raise ArgumentError(f"{_RULE}; clip_norm gave a value of shape {value.shape}")
    known = float(value.numpy()) if tf.executing_eagerly() else _static_value(value)
    if known is not None:
        _check_number(known, known)
        return value
    ok = tf.logical_and(tf.math.is_finite(value), value > 0)
    check = tf.debugging.Assert(ok, ["distclip: clip_norm must be a positive finite number; got clip_norm =", value])
    with tf.control_dependencies([check]):
        return tf.identity(value)


MakeVariable = Callable[[str, Tuple[int, ...], tf.DType, float], Any]


class Threshold:
    """A step's `clip_norm` as the step uses it, with a policy's state in variables.

    `clip_norm` is anything `check_clip_norm` accepted, or a `distclip._src.policies.Policy`,
    whose state lives in variables made by `make_variable(name, shape, dtype, initial)`
    (tf.Variables for `ClipStep`, Keras variables for `ClipOptimizer`, so each
    is saved the way its owner is).
    """

    def __init__(self, clip_norm: Any, make_variable: MakeVariable):
        self.policy = clip_norm if isinstance(clip_norm, Policy) else None
        self.clip_norm = clip_norm
        spec = self.policy.state_spec() if self.policy else {}
        self.state = {name: make_variable(name, shape, dtype, initial)
                      for name, (shape, dtype, initial) in spec.items()}

    def _values(self) -> Dict[str, tf.Tensor]:
        return {k: tf.convert_to_tensor(tf_variable(v)) for k, v in self.state.items()}

    def at(self, step: Optional[tf.Tensor]) -> Callable[[tf.Tensor], tf.Tensor]:
        """This step's threshold as a function of the synchronized norm (a fixed value or schedule is resolved now)."""
        policy = self.policy
        if policy is None:
            value = resolve_clip_norm(self.clip_norm, step)
            return lambda norm: value
        values = self._values()
        return lambda norm: tf.cast(policy.threshold(values, norm), tf.float32)

    def updates(self, norm: tf.Tensor, finite: tf.Tensor) -> List[Tuple[Any, tf.Tensor]]:
        """(variable, new value) pairs that advance the policy's state past `norm` (unchanged if not finite)."""
        if self.policy is None:
            return []
        old = self._values()
        safe = tf.where(finite, norm, 0.0)
        new = self.policy.update(old, safe)
        return [(self.state[k], tf.where(finite, tf.cast(new[k], old[k].dtype), old[k])) for k in self.state]
