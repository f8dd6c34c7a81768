"""Starting worker processes for tests: free ports, bounded waits, nothing left running."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import List, Sequence


def free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_all(commands: Sequence[Sequence[str]], envs: Sequence[dict], timeout: float) -> List[subprocess.CompletedProcess]:
    """Runs the commands together; if one fails or time runs out, kills the rest. Never hangs."""
    procs = [
        subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for cmd, env in zip(commands, envs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    results = []
    for cmd, p in zip(commands, procs):
        out, _ = p.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(cmd, p.returncode, out, None))
    return results


def python() -> str:
    return sys.executable
