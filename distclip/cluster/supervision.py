"""What the launcher and the watchdog share in supervising processes: signals passed on, and stopping.

Both forward SIGTERM and SIGINT (the watchdog SIGHUP too) to what they run,
after SIGCONT (a stopped process cannot act on SIGTERM), and stop it the
same way: SIGCONT, SIGTERM, then SIGKILL once a bounded grace is over, as
Slurm does after KillWait. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import signal
import time
from typing import Callable, Iterable, List, Optional, Tuple

#: Seconds between SIGTERM and SIGKILL when a peer failed (nothing useful can finish without it).
FAILURE_GRACE_S = 5.0


def exit_reason(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it), in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP, SIGTSTP): it will never answer its peers."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class Forwarding:
    """While inside, `signals` sent to this process go to `send` (after SIGCONT) and are remembered.

    `first` is the first one received and when (monotonic seconds), or None; `overdue(grace)` says whether
    `grace` seconds have passed since it, the moment to kill what still runs.
    """

    def __init__(self, signals: Iterable[int], send: Callable[[int], None]):
        self.signals, self.send = tuple(signals), send
        self.received: List[Tuple[int, float]] = []
        self._old: dict = {}

    def _handle(self, signum: int, _frame) -> None:
        self.received.append((signum, time.monotonic()))
        for sig in (signal.SIGCONT, signum):
            self.send(sig)

    def __enter__(self) -> "Forwarding":
        self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def first(self) -> Optional[Tuple[int, float]]:
        return self.received[0] if self.received else None

    def overdue(self, grace: float, now: Optional[float] = None) -> bool:
        first = self.first
        return first is not None and (time.monotonic() if now is None else now) > first[1] + grace


def terminate(send: Callable[[int], None], running: Callable[[], bool], grace: float) -> None:
    """Stops what `send` signals: SIGCONT and SIGTERM, then SIGKILL once `running()` is still true after
    `grace` seconds (polled every 0.1 s)."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        send(sig)
    end = time.monotonic() + grace
    while running() and time.monotonic() < end:
        time.sleep(0.1)
    send(signal.SIGKILL)
