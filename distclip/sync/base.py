"""The seam every synchronization engine implements."""
from __future__ import annotations

from typing import List, Protocol, Sequence

from distclip.norm import Gradient

SUM = "sum"
MEAN = "mean"


class Backend(Protocol):
    """How gradients are made identical across replicas.

    `all_reduce_sum` takes every gradient of one step (no `None`) and returns
    their sums over all replicas, from one packed collective per dtype, in
    order, identical on every replica. It is called from inside the replica
    function (`strategy.run`, or each Horovod process), possibly inside
    `tf.function`. Backends only sum: the 1/n of a mean is folded into the clip
    multiply (`distclip.clip`), which saves the collective's own pass over
    every gradient to divide it.
    """

    name: str
    #: The reduction `reduction="auto"` means for this engine: `SUM` or `MEAN`.
    default_reduction: str

    def num_replicas(self) -> int: ...

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]: ...
