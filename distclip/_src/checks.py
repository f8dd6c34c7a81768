"""Checks of the gradients and variables a step is given; each error names the argument and value."""
from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from distclip._src.errors import ArgumentError
from distclip._src.variables import variable_name


#: The largest count, period or step an integer argument takes: distclip counts updates in int64, and sums a
#: count with an update number, so 2**62 leaves headroom (about 1.5e11 years at one update per millisecond).
LARGEST = 2 ** 62


def check_integer(name: str, value: Any, low: int, high: int = LARGEST) -> None:
    """Raises ArgumentError naming `name`, `value` and the range unless `value` is an integer (not a bool) in
    [`low`, `high`]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise ArgumentError(f"{name} must be an integer from {low} to {high}; got {name}={short_repr(value)}")


def check_number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = True,
                 high_open: bool = False, integer: bool = False, rule: Optional[str] = None) -> Any:
    """Returns `value` if it is a finite real number (an integer with `integer`; not a bool) between `low` and
    `high` (each excluded where open); raises ArgumentError naming `name`, `value` and the `rule` (by default
    the bounds, in words) otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = isinstance(value, numbers.Integral)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if rule is None:
            rule = f"{'an integer' if integer else 'a number'} {'>' if low_open else '>='} {low}" + (
                f" and {'<' if high_open else '<='} {high}" if high != math.inf else "")
        raise ArgumentError(f"{name} must be {rule}; got {name}={value!r}")
    return value


def short_repr(value: Any) -> str:
    """`repr(value)`, cut to 120 characters; a NumPy scalar as its number (NumPy 2 writes `np.float64(5.0)`)."""
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_gradients(grads: Any, name: str = "grads") -> List[Any]:
    """A list of float `tf.Tensor`/`tf.IndexedSlices`/`None`, not empty, not all `None`."""
    if isinstance(grads, (tf.Tensor, tf.IndexedSlices, tf.Variable)) or not isinstance(grads, (list, tuple)):
        raise ArgumentError(f"{name} must be a list or tuple of gradients; got {name}={short_repr(grads)}")
    grads = list(grads)
    if not grads:
        raise ArgumentError(f"{name} is empty: there is nothing to clip")
    out = []
    for i, g in enumerate(grads):
        if g is None or isinstance(g, tf.IndexedSlices):
            out.append(g)
            continue
        try:
            g = tf.convert_to_tensor(g)
        except (TypeError, ValueError) as e:
            raise ArgumentError(f"{name}[{i}] is not a tensor: {short_repr(g)} ({e})") from None
        out.append(g)
    for i, g in enumerate(out):
        dtype = None if g is None else (g.values.dtype if isinstance(g, tf.IndexedSlices) else g.dtype)
        if dtype is not None and not dtype.is_floating:
            raise ArgumentError(
                f"{name}[{i}] has dtype {dtype.name}; gradients must be floating point "
                "(float16, bfloat16, float32 or float64)"
            )
    if all(g is None for g in out):
        raise ArgumentError(f"every entry of {name} is None ({len(out)} of them): no variable received a gradient")
    return out


def check_pairs(grads: Any, variables: Any) -> Tuple[List[Any], List[Any]]:
    """Gradients and variables of the same length, gradients checked."""
    grads = check_gradients(grads)
    if isinstance(variables, (tf.Variable, tf.Tensor)) or not isinstance(variables, (list, tuple)):
        raise ArgumentError(f"trainable_variables must be a list or tuple of variables; got {short_repr(variables)}")
    variables = list(variables)
    if len(grads) != len(variables):
        raise ArgumentError(
            f"grads and trainable_variables differ in length: {len(grads)} gradients for "
            f"{len(variables)} variables"
        )
    for i, (g, v) in enumerate(zip(grads, variables, strict=True)):
        if g is not None and not _same_shape(g, v):
            shape = f"values of shape {g.values.shape}" if isinstance(g, tf.IndexedSlices) else f"shape {g.shape}"
            raise ArgumentError(
                f"grads[{i}] has {shape}, but trainable_variables[{i}] ({variable_name(v)}) has shape "
                f"{tf.TensorShape(v.shape)}: each gradient must have its variable's shape (nothing is broadcast)")
    return grads, variables


def _same_shape(grad: Any, variable: Any) -> bool:
    """The gradient's shape equals the variable's where both are known (rows of `tf.IndexedSlices` aside)."""
    want = tf.TensorShape(variable.shape)
    if isinstance(grad, tf.IndexedSlices):
        got, want = grad.values.shape[1:], want[1:]
    else:
        got = grad.shape
    return got.rank is None or want.rank is None or (got.rank == want.rank and got.is_compatible_with(want))


def split_pairs(grads_and_vars: Any) -> Tuple[List[Any], List[Any]]:
    try:
        pairs = [tuple(p) for p in grads_and_vars]
    except TypeError:
        raise ArgumentError("grads_and_vars must be an iterable of (gradient, variable) pairs; "
                            f"got {short_repr(grads_and_vars)}") from None
    bad = [i for i, p in enumerate(pairs) if len(p) != 2]
    if bad:
        raise ArgumentError(f"grads_and_vars[{bad[0]}] is not a (gradient, variable) pair: {short_repr(pairs[bad[0]])}")
    return [p[0] for p in pairs], [p[1] for p in pairs]
