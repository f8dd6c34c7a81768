"""The tf.distribute backend: `ReplicaContext.all_reduce` inside `strategy.run`.

All gradients go to one `all_reduce` call. The strategy's cross-device ops then
pack the dense ones into one collective (`CollectiveAllReduce` concatenates them
into one buffer; NCCL and TPU `cross_replica_sum` likewise batch them), and
all-gather `tf.IndexedSlices` so they stay sparse. The result is identical on
every replica. No host synchronization: this is also the `TPUStrategy` path.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from distclip._src.errors import ContextError
from distclip._src.norm import Gradient
from distclip._src.sync.base import SUM


class TFDistributeBackend:
    name = "tf_distribute"
    # TensorFlow's convention: each replica's loss is already divided by the
    # global batch size (tf.nn.compute_average_loss, Keras losses under a
    # strategy), so the SUM of replica gradients is the global-batch gradient.
    default_reduction = SUM
    # One packed collective: the strategy's cross-device ops pack it (not measured with buckets).
    default_bucket_mb: Optional[float] = None

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy

    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def _tasks(self) -> Tuple[int, int]:
        """(this worker's rank, workers) from MultiWorkerMirroredStrategy's cluster; one process otherwise."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if (resolver is None or not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
                or not resolver.task_type):
            return 0, 1
        spec = resolver.cluster_spec().as_dict()
        chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
        rank = 0 if resolver.task_type == "chief" else chiefs + resolver.task_id
        return rank, chiefs + workers

    def rank(self) -> int:
        return self._tasks()[0]

    def size(self) -> int:
        return self._tasks()[1]

    def replica_index(self) -> Any:
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]:
        # A traced tensor with no device (a function input passed straight in) gives
        # MultiWorkerMirroredStrategy's reduction no destination; place it on this replica's device.
        grads = [tf.identity(g) if isinstance(g, tf.Tensor) and not g.device and not tf.executing_eagerly() else g
                 for g in grads]
        return list(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads))

    def broadcast(self, variables: Sequence[Any], root: int) -> None:
        pass  # mirrored variables start identical (MultiWorkerMirroredStrategy broadcasts worker 0's)

    def all_gather(self, local: Callable[[], tf.Tensor], name: str) -> np.ndarray:
        strategy = self.strategy
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            raise ContextError(f"{name} was called inside strategy.run: call it between steps")
        with strategy.scope():
            return strategy.gather(strategy.run(lambda: local()[tf.newaxis]), axis=0).numpy()

