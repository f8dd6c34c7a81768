"""`verify_replicas`: are the variables bit-for-bit the same on every replica?"""
from __future__ import annotations

from typing import Any, List, Sequence

import tensorflow as tf

from distclip._src import sync
from distclip._src.variables import tf_variable, variable_name

_INT = {1: tf.int8, 2: tf.int16, 4: tf.int32, 8: tf.int64}


class ReplicaMismatchError(RuntimeError):
    """Replicas hold different values for a variable that should be identical."""


def checksum(value: tf.Tensor) -> tf.Tensor:
    """An int64 checksum of the exact bits: `sum_i bits_i * (i mod 65521 + 1)` (wrapping).

    Any changed bit, and any two swapped elements, change it. One pass over the
    variable: cheap enough to run every few hundred steps.
    """
    value = tf.reshape(tf.convert_to_tensor(value), [-1])
    if value.dtype.is_floating or value.dtype.is_integer:
        bits = tf.bitcast(value, _INT[value.dtype.size]) if value.dtype.is_floating else value
    else:
        bits = tf.cast(value, tf.int8)
    weights = tf.math.floormod(tf.range(tf.size(bits, out_type=tf.int64), dtype=tf.int64), 65521) + 1
    return tf.reduce_sum(tf.cast(bits, tf.int64) * weights)


def verify_replicas(variables: Sequence[Any]) -> List[int]:
    """Compares a checksum of every variable across all replicas; raises on the first that differs.

    Through the backend that holds them (`distclip._src.sync.current`):
    tf.distribute (every replica's copy, gathered across workers with
    `strategy.gather`), Horovod (allgather), or mpi4py for processes launched
    by mpirun or srun under neither. Call it outside `strategy.run`.

    Args:
      variables: Keras or TensorFlow variables, in the same order on every process.

    Returns:
      Each variable's checksum (`checksum`), the same on every replica.

    Raises:
      ReplicaMismatchError: naming the first variable that differs, with its
        checksum on each replica.
    """
    variables = list(variables)
    if not variables:
        return []
    values = [tf_variable(v) for v in variables]
    per_replica = sync.current(values).all_gather(lambda: tf.stack([checksum(v) for v in values]),
                                                  "distclip_verify_replicas")
    for i, v in enumerate(variables):
        column = [int(row[i]) for row in per_replica]
        if len(set(column)) > 1:
            raise ReplicaMismatchError(
                f"variable {variable_name(v)!r} differs across replicas: checksums by replica {column}")
    return [int(c) for c in per_replica[0]]
