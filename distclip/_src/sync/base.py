"""The seam every synchronization backend implements."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Protocol, Sequence

import numpy as np
import tensorflow as tf

from distclip._src.norm import Gradient

SUM = "sum"
MEAN = "mean"


class Backend(Protocol):
    """A backend that keeps replicas identical: tf.distribute, Horovod, an MPI world, or none.

    `all_reduce_sum` takes every gradient of one step (no `None`) and returns
    their sums over all replicas, from one packed collective per dtype, in
    order, identical on every replica. It is called from inside the replica
    function (`strategy.run`, or each Horovod process), possibly inside
    `tf.function`. Backends only sum: the 1/n of a mean is folded into the clip
    multiply (`distclip._src.clip`), which saves the collective's own pass over
    every gradient to divide it.

    The rest runs eagerly, between steps: `rank`/`size` place this process
    among the job's processes (rank 0 writes the files), `broadcast` makes
    every process's variables those of process `root`, and `all_gather` stacks
    a small tensor from every replica (a checksum, a flag).
    """

    name: str
    #: The reduction `reduction="auto"` means for this backend: `SUM` or `MEAN`.
    default_reduction: str
    #: What `bucket_mb="auto"` means for this backend: None (one packed all-reduce) or a bucket size in MB.
    default_bucket_mb: Optional[float]

    def num_replicas(self) -> int:
        """Replicas in sync: devices under tf.distribute, processes under Horovod or MPI."""

    def rank(self) -> int:
        """This process's index among the job's processes, 0 to `size() - 1`."""

    def size(self) -> int:
        """Processes in the job (one under MirroredStrategy, whatever its replicas)."""

    def replica_index(self) -> Any:
        """This replica's index among the `num_replicas()`, inside the replica function (an int or a scalar
        tensor): `replica_id_in_sync_group` under tf.distribute, the rank under Horovod."""

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]: ...

    def broadcast(self, variables: Sequence[Any], root: int) -> None: ...

    def all_gather(self, local: Callable[[], tf.Tensor], name: str) -> np.ndarray:
        """`local()` evaluated on every replica, stacked as `[num_replicas, ...]` in replica order,
        the same on every process. `name` names the collective (and the caller, in errors)."""


class OneReplicaPerProcess:
    """What the backends with one replica per process share (Horovod, an MPI world).

    Their convention: each rank's loss is the mean over its own batch, and
    gradients are averaged across ranks (`reduction="auto"` is MEAN).
    """

    default_reduction = MEAN
    default_bucket_mb: Optional[float] = None

    def size(self) -> int:
        raise NotImplementedError

    def num_replicas(self) -> int:
        return self.size()

    def rank(self) -> int:
        raise NotImplementedError

    def replica_index(self) -> Any:
        return self.rank()
