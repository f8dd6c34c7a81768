"""This process among the job's replicas, as distclip sees them: rank, size, replicas, small all-gathers."""
from __future__ import annotations

from typing import Any, Sequence

from distclip._src.sync import current

__all__ = ["current_backend"]


def current_backend(variables: Sequence[Any] = ()) -> Any:
    """The backend that keeps this process's replicas identical, as the clip step with `backend="auto"` finds it.

    First match wins: the tf.distribute strategy of `variables` (or the one in
    scope) with more than one replica; Horovod, initialized, with more than one
    process; one process of an MPI world (`mpirun`, `srun`); else one replica.
    Between steps, `rank()` and `size()` place this process among the job's
    processes (rank 0 writes the files), `num_replicas()` counts the replicas,
    and `all_gather(local, name)` stacks a small tensor from every replica,
    the same on every process (a collective: call it on every process).

    Args:
      variables: the model's variables, to find the strategy that holds them (else the one in scope).

    Returns:
      The backend, with `name` ("tf_distribute", "horovod", "mpi" or "none"),
      `rank()`, `size()`, `num_replicas()` and `all_gather(local, name)`.
    """
    return current(variables)
