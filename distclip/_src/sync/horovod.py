"""The Horovod backend: one `hvd.grouped_allreduce` per step, in or out of `tf.function`.

Horovod fuses the group into one collective per dtype (its tensor fusion
buffer); `tf.IndexedSlices` are all-gathered (values and indices), as
`hvd.allreduce` does. Works with Keras 3 variables: it never touches them
(`hvd.DistributedGradientTape` fails on Keras 3 variables, horovod issue 4290).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from distclip._src.errors import ContextError
from distclip._src.norm import Gradient
from distclip._src.sync.base import OneReplicaPerProcess
from distclip._src.variables import tf_variable


def active() -> bool:
    """Whether this process runs under an initialized Horovod with more than one process.

    Looks only at a Horovod the program already imported: distclip never
    imports (or initializes) Horovod behind the user's back.
    """
    hvd = sys.modules.get("horovod.tensorflow")
    return hvd is not None and hvd.is_initialized() and hvd.size() > 1


def _hvd():
    try:
        import horovod.tensorflow as hvd
    except ImportError as e:
        raise ContextError(
            f"backend='horovod' needs Horovod built against this TensorFlow ({e}): pip cannot install it for "
            "TensorFlow 2.19 and later; `bash scripts/install-horovod.sh $(which python)` from distclip's source "
            "builds and installs it (docs: Horovod)") from None
    if not hvd.is_initialized():
        raise ContextError("backend='horovod': call hvd.init() (import horovod.tensorflow as hvd) first")
    return hvd


class HorovodBackend(OneReplicaPerProcess):
    name = "horovod"
    # Buckets sent as they are ready, as PyTorch DDP's 25 MB default (measured: docs/scaling.md).
    default_bucket_mb: Optional[float] = 25.0

    def __init__(self):
        self._hvd = _hvd()

    def rank(self) -> int:
        return self._hvd.rank()

    def size(self) -> int:
        return self._hvd.size()

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]:
        # Sum, not Average: Average is Sum plus a pass over the fused buffer to
        # divide, which the clip multiply does for free (distclip._src.clip).
        # tf.IndexedSlices go first: Horovod 0.28.1's grouped_allreduce takes each one's dense_shape from the
        # group's first tensors (`zip(new_values, new_indices, tensors)`), which fails on a dense tensor.
        order = sorted(range(len(grads)), key=lambda i: not isinstance(grads[i], tf.IndexedSlices))
        summed = self._hvd.grouped_allreduce([grads[i] for i in order], op=self._hvd.Sum, name="distclip_grads")
        out: List[Gradient] = [None] * len(grads)
        for i, g in zip(order, summed, strict=True):
            out[i] = g
        return out

    def broadcast(self, variables: Sequence[Any], root: int) -> None:
        self._hvd.broadcast_variables([tf_variable(v) for v in variables], root_rank=root)

    def all_gather(self, local: Callable[[], tf.Tensor], name: str) -> np.ndarray:
        return self._hvd.allgather(tf.convert_to_tensor(local())[tf.newaxis], name=name).numpy()
