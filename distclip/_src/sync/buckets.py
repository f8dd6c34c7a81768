"""Which gradients travel together: one packed collective, or buckets in reverse layer order.

`plan(grads, bucket_mb)` returns the order of collectives as lists of indices into `grads`:
  * `bucket_mb=None`: one bucket holding every gradient, in order: one packed all-reduce after the
    whole backward pass (one collective per dtype); the default under tf.distribute;
  * `bucket_mb=B`: the gradients from the last to the first, cut into buckets of at most B megabytes
    (a larger gradient alone), like PyTorch DDP's `bucket_cap_mb`. Backpropagation produces the last
    layers' gradients first; each bucket's all-reduce depends on its own gradients only, so TensorFlow's
    executor can start it while the first layers are still being differentiated, and the bucket's share
    of the norm (`sum_of_squares`) is computed as soon as it arrives. The default under Horovod (25 MB;
    `benchmarks/horovod_buckets.py` measures it against one group: docs/scaling.md).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import tensorflow as tf

from distclip._src.norm import Gradient

MB = 1 << 20


def _bytes(grad: Gradient) -> int:
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    elements = values.shape.num_elements()
    return (elements if elements is not None else MB) * values.dtype.size  # unknown shape: on its own, roughly


def plan(grads: Sequence[Gradient], bucket_mb: Optional[float]) -> List[List[int]]:
    """Indices of `grads` per collective, in the order they are sent (see the module docstring)."""
    if bucket_mb is None:
        return [list(range(len(grads)))]
    cap, size = bucket_mb * MB, 0.0
    buckets: List[List[int]] = []
    for i in reversed(range(len(grads))):
        n = _bytes(grads[i])
        if buckets and size + n <= cap:
            buckets[-1].append(i)
            size += n
        else:
            buckets.append([i])
            size = n
    return buckets
