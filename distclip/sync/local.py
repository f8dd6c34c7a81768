"""The "none" backend: no communication; gradients are taken as already synchronized.

Right for a single replica (no strategy, the default strategy, `OneDeviceStrategy`),
and for callers that reduced the gradients themselves.
"""
from __future__ import annotations

from typing import List, Sequence

from distclip.norm import Gradient
from distclip.sync.base import SUM


class LocalBackend:
    name = "none"
    default_reduction = SUM

    def num_replicas(self) -> int:
        return 1

    def all_reduce_sum(self, grads: Sequence[Gradient]) -> List[Gradient]:
        return list(grads)
