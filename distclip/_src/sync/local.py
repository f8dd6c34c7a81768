"""The "none" backend: no communication; gradients are taken as already synchronized.

Right for a single replica (no strategy, the default strategy, `OneDeviceStrategy`),
and for callers that reduced the gradients themselves.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from distclip._src.norm import Gradient
from distclip._src.sync.base import SUM


class LocalBackend:
    name = "none"
    default_reduction = SUM
    default_bucket_mb: Optional[float] = None

    def num_replicas(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def replica_index(self) -> Any:
        return 0

    def size(self) -> int:
        return 1

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]:
        return list(grads)

    def broadcast(self, variables: Sequence[Any], root: int) -> None:
        pass

    def all_gather(self, local: Callable[[], tf.Tensor], name: str) -> np.ndarray:
        return np.asarray(local())[np.newaxis]
