"""Where a non-finite step came from, in words: replica index to worker, host and device, and the log line.

The step itself finds which replicas' own gradients and which variables'
synchronized gradients held an inf or a NaN (`distclip._src.nonfinite`), as
index vectors identical on every replica. This module, between steps and on
the host, turns them into places and a line such as

    step 1234 skipped: non-finite gradients from replica 3 (worker 1, host gpu-07, GPU:1) in dense_2/kernel

`replica_places` is a collective (an all-gather of each replica's host and
device), so every process calls it, once, at the same point: at the start of
training.
"""
from __future__ import annotations

import socket
from typing import Any, List, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from distclip._src import sync

_FIELD = 64  # bytes for "host\0device" per replica in the all-gather


class ReplicaPlace(NamedTuple):
    """Where replica `replica` runs: its worker (process rank), host name and local device."""

    replica: int
    worker: int
    host: str
    device: str


class NonfiniteUpdate(NamedTuple):
    """One non-finite update: its step, whether it was skipped, the replicas whose own gradients were
    non-finite (`ReplicaPlace`s), and the variables whose synchronized gradients were (names)."""

    step: int
    skipped: bool
    replicas: List[ReplicaPlace]
    variables: List[str]

    @classmethod
    def from_flags(cls, step: int, skipped: bool, replica_flags: np.ndarray, variable_flags: np.ndarray,
                   places: Sequence[ReplicaPlace], names: Sequence[str]) -> "NonfiniteUpdate":
        """The record of one update, from the step's 0/1 flag vectors.

        Args:
          step: the update's step number.
          skipped: whether the update was skipped.
          replica_flags: 1 per replica whose own gradients held an inf or a NaN.
          variable_flags: 1 per variable whose synchronized gradient held one.
          places: every replica's place (`distclip._src.attribution.replica_places`).
          names: the variables' names, in the order of `variable_flags`.

        Returns:
          The `NonfiniteUpdate`.
        """
        return cls(step=step, skipped=skipped,
                   replicas=[places[int(r)] for r in np.flatnonzero(np.asarray(replica_flags))],
                   variables=[names[int(i)] for i in np.flatnonzero(np.asarray(variable_flags))])

    def line(self, most: int = 8) -> str:
        """The one-line account of the update, as `distclip.ClipReporter` prints it.

        Args:
          most: the most variables named (the rest counted).

        Returns:
          The line, such as "step 12 skipped: non-finite gradients from replica 1 (worker 0, host node-3,
          CPU:1) in dense/kernel".
        """
        what = "skipped" if self.skipped else "not finite"
        if self.replicas:
            source = "from " + ("replica " if len(self.replicas) == 1 else "replicas ") + ", ".join(
                f"{p.replica} (worker {p.worker}, host {p.host}, {p.device})" for p in self.replicas)
        else:
            source = "after the all-reduce (each replica's own gradients were finite)"
        names = ", ".join(self.variables[:most]) + (
            f" and {len(self.variables) - most} more" if len(self.variables) > most else "")
        return f"step {self.step} {what}: non-finite gradients {source}" + (f" in {names}" if names else "")


def _short(device: str) -> str:
    """"/job:worker/replica:0/task:1/device:CPU:0" -> "CPU:0"."""
    return device.rsplit("device:", 1)[-1] if "device:" in device else device


def replica_places(variables: Sequence[Any] = ()) -> List[ReplicaPlace]:
    """Every replica's worker, host and device, the same list on every process (a collective: call on all).

    Args:
      variables: the model's variables, to find the strategy that holds them (else the one in scope).

    Returns:
      One `ReplicaPlace` per replica, in replica order.
    """
    backend = sync.current(variables)
    host = socket.gethostname()
    if isinstance(backend, sync.TFDistributeBackend):
        devices = [_short(d) for d in backend.strategy.extended.worker_devices]
        local = len(devices)
        hosts = [_decode(row)[0] for row in backend.all_gather(lambda: _encode(host, ""), "replica_places")]
        return [ReplicaPlace(r, r // local, h, devices[r % local]) for r, h in enumerate(hosts)]
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    rows = backend.all_gather(lambda: _encode(host, device), "replica_places")
    return [ReplicaPlace(r, r, *_decode(row)) for r, row in enumerate(rows)]


def _encode(host: str, device: str) -> tf.Tensor:
    data = f"{host}\0{device}".encode()[:_FIELD].ljust(_FIELD, b"\0")
    return tf.constant(np.frombuffer(data, np.uint8).astype(np.int32))


def _decode(row: np.ndarray) -> List[str]:
    text = bytes(np.asarray(row, np.int64).astype(np.uint8)).decode(errors="replace")
    host, _, device = text.partition("\0")
    return [host, device.rstrip("\0")]

