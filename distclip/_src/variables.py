"""Variables as distclip meets them: a Keras 3 `keras.Variable` or a `tf.Variable` (mirrored or not)."""
from __future__ import annotations

import re
from typing import Any, Tuple

import keras
import tensorflow as tf


def tf_variable(variable: Any) -> Any:
    """The TensorFlow variable behind `variable`: a Keras variable's `.value`, anything else as it is.

    Strategies, Horovod and `tf.convert_to_tensor` work on TensorFlow's
    variables (a mirrored one under a strategy); a Keras 3 variable wraps one.
    """
    return variable.value if isinstance(variable, keras.Variable) else variable


def read_value(variable: Any) -> tf.Tensor:
    """The value of `variable` (Keras or TensorFlow) as a tensor: this replica's copy inside a replica function."""
    return tf.convert_to_tensor(tf_variable(variable))


def variable_name(variable: Any) -> str:
    """A variable's Keras path, or its TensorFlow name, for messages."""
    return getattr(variable, "path", None) or getattr(variable, "name", None) or repr(variable)


def variable_path(variable: Any) -> str:
    """A variable's Keras path ("dense/kernel"), or its TensorFlow name without the output index (":0")."""
    path = getattr(variable, "path", None)
    if path:
        return path
    return re.sub(r":\d+$", "", getattr(variable, "name", None) or repr(variable))


def identical_variable(name: str, shape: Tuple[int, ...], dtype: tf.DType, initial: float) -> tf.Variable:
    """A variable written by each replica with a value identical on every replica (no aggregation needed)."""
    return tf.Variable(
        tf.fill(shape, tf.constant(initial, dtype)), trainable=False, name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.NONE,
    )
