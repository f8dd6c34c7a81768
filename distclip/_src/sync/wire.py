"""What gradients look like on the wire: optional densifying and fp16 compression, for any backend.

`encode` runs before the all-reduce and `decode` after it, so the norm is
computed on the decompressed values in their own dtype:
  * `sparse_as_dense=True`: `tf.IndexedSlices` become dense tensors and join
    the packed all-reduce (cheaper than an all-gather when most rows are hit);
  * `compression="fp16"`: float32/float64 gradients travel as float16 (half
    the bytes; values beyond float16's range become inf, and the step is then
    treated as non-finite), as `hvd.Compression.fp16` does.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Sequence, Tuple

import tensorflow as tf

from distclip._src.norm import Gradient

Compression = Optional[Literal["none", "fp16"]]
COMPRESSIONS: Tuple[Optional[str], ...] = (None, "none", "fp16")


def _cast(grad: Gradient, dtype: tf.DType) -> Gradient:
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(tf.cast(grad.values, dtype), grad.indices, grad.dense_shape)
    return tf.cast(grad, dtype)


def _dtype(grad: Gradient) -> tf.DType:
    return grad.values.dtype if isinstance(grad, tf.IndexedSlices) else grad.dtype


def encode(grads: Sequence[Gradient], *, sparse_as_dense: bool,
           compression: Optional[str]) -> Tuple[List[Gradient], List[tf.DType]]:
    """The gradients to send, and their original dtypes for `decode`."""
    dtypes = [_dtype(g) for g in grads]
    out = [tf.convert_to_tensor(g) if sparse_as_dense and isinstance(g, tf.IndexedSlices) else g for g in grads]
    if compression == "fp16":
        out = [_cast(g, tf.float16) if d in (tf.float32, tf.float64) else g for g, d in zip(out, dtypes, strict=True)]
    return out, dtypes


def decode(grads: Sequence[Gradient], dtypes: Sequence[tf.DType]) -> List[Gradient]:
    return [g if _dtype(g) == d else _cast(g, d) for g, d in zip(grads, dtypes, strict=True)]
