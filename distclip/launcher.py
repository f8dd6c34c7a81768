"""A local launcher for MultiWorkerMirroredStrategy: N processes, each with its TF_CONFIG.

The TensorFlow analogue of `torchrun --standalone`:

    python -m distclip.launcher --nproc 2 -- distclip train --strategy multiworker

Each worker gets a TF_CONFIG naming all N workers on free localhost ports and
its own index. SIGINT and SIGTERM are forwarded to every worker. If a worker
exits non-zero or is killed, the launcher stops the others (SIGTERM, then
SIGKILL after --grace seconds) and exits non-zero, naming the worker's rank and
how it ended. It never waits forever: --timeout bounds the whole run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from distclip.cluster import free_ports


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def launch(command: Sequence[str], nproc: int, timeout: Optional[float] = None, grace: float = 10.0,
           log=sys.stderr) -> int:
    """Runs `command` as `nproc` workers; returns 0 if all succeed, else a non-zero status."""
    workers = [f"localhost:{p}" for p in free_ports(nproc, "127.0.0.1")]
    procs: List[subprocess.Popen] = []
    for i in range(nproc):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen(list(command), env=env, start_new_session=True))

    def signal_all(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    received: List[int] = []

    def forward(signum, _frame):
        received.append(signum)
        signal_all(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every worker: `any` would stop at the first live one
            if all(c is not None for c in codes):
                break
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"distclip.launcher: worker {rank} (pid {procs[rank].pid}) {describe(code)}; "
                      f"stopping the other {sum(p.poll() is None for p in procs)} worker(s)", file=log, flush=True)
                status = code if code > 0 else 128 - code
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"distclip.launcher: --timeout {timeout:g} s reached; stopping all workers", file=log, flush=True)
                status = 124
                break
            time.sleep(0.1)
        if status:
            signal_all(signal.SIGTERM)
            end = time.monotonic() + grace
            while any(p.poll() is None for p in procs) and time.monotonic() < end:
                time.sleep(0.1)
            signal_all(signal.SIGKILL)
        for p in procs:
            p.wait()
        if not status:
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
            if failed:
                rank, code = failed[0]
                print(f"distclip.launcher: worker {rank} {describe(code)}", file=log, flush=True)
                status = code if code > 0 else 128 - code
        if received and not status:
            status = 128 + received[0]
        return status
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal_all(signal.SIGKILL)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distclip.launcher", description=__doc__.splitlines()[0],
                                usage="%(prog)s [--nproc N] [--timeout S] [--grace S] -- COMMAND [ARGS...]")
    p.add_argument("--nproc", type=int, default=2, help="number of workers (default 2)")
    p.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping workers")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    if args.nproc < 1:
        p.error(f"--nproc must be a positive integer; got {args.nproc}")
    return launch(command, args.nproc, args.timeout, args.grace)


if __name__ == "__main__":
    sys.exit(main())
