"""The tf.distribute backend: `ReplicaContext.all_reduce` inside `strategy.run`.

All gradients go to one `all_reduce` call. The strategy's cross-device ops then
pack the dense ones into one collective (`CollectiveAllReduce` concatenates them
into one buffer; NCCL and TPU `cross_replica_sum` likewise batch them), and
all-gather `tf.IndexedSlices` so they stay sparse. The result is identical on
every replica. No host synchronization: this is also the `TPUStrategy` path.
"""
from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from distclip.norm import Gradient
from distclip.sync.base import SUM


class TFDistributeBackend:
    name = "tf_distribute"
    # TensorFlow's convention: each replica's loss is already divided by the
    # global batch size (tf.nn.compute_average_loss, Keras losses under a
    # strategy), so the SUM of replica gradients is the global-batch gradient.
    default_reduction = SUM

    def __init__(self, replica_context: tf.distribute.ReplicaContext):
        self._ctx = replica_context

    def num_replicas(self) -> int:
        return self._ctx.num_replicas_in_sync

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]:
        # A traced tensor with no device (a function input passed straight in) gives
        # MultiWorkerMirroredStrategy's reduction no destination; place it on this replica's device.
        grads = [tf.identity(g) if isinstance(g, tf.Tensor) and not g.device and not tf.executing_eagerly() else g
                 for g in grads]
        return list(self._ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads))
