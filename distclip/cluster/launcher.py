"""A local launcher for MultiWorkerMirroredStrategy: N processes, each with its TF_CONFIG.

The TensorFlow analogue of `torchrun --standalone`:

    python -m distclip.cluster.launcher --nproc 2 -- distclip train --strategy multiworker

Each worker gets a TF_CONFIG naming all N workers on free localhost ports and
its own index. SIGINT and SIGTERM are forwarded to every worker, and whatever
still runs --grace seconds later (default 30) is killed. If a worker exits
non-zero or is killed, the launcher stops the others (SIGTERM, then SIGKILL
after 5 s, or --grace if shorter) and exits non-zero, naming the worker's rank and how it
ended; a worker that exits with status 0 while the others still run, or is
stopped, ends the run after --exit-wait seconds (default 50). It never waits
forever: --timeout bounds the whole run.

The workers run in a private network namespace with only a loopback interface
(TensorFlow's gRPC servers listen on every interface, unauthenticated), unless
--host-network; they then cannot reach other machines either.
"""
from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

from distclip.cluster import free_ports
from distclip.cluster.netns import isolate
from distclip.cluster.supervision import FAILURE_GRACE_S, Forwarding, exit_reason, is_stopped, terminate


def _why(e: OSError) -> str:
    """An OS error in words, with what to do where the cause is a limit of this process."""
    if e.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (f"too many open files (this process may open {soft}, `ulimit -n`; each worker needs a few): "
                "raise the limit or start fewer workers")
    return str(e)


def launch(command: Sequence[str], nproc: int, timeout: Optional[float] = None, grace: float = 30.0,
           exit_wait: float = 50.0, log=sys.stderr) -> int:
    """Runs `command` as `nproc` workers; returns 0 if all succeed, else a non-zero status. Never hangs:

    * a worker that fails (non-zero status, killed) stops the others at once
      (SIGTERM, then SIGKILL after min(`grace`, 5) seconds);
    * a worker that exits with status 0 while others still run, or that is
      stopped (SIGSTOP), stops the others after `exit_wait` seconds if they
      have not finished by then (they would wait for it forever);
    * SIGINT and SIGTERM are forwarded, and `grace` seconds later whatever
      still runs is killed (SIGKILL), as Slurm does after KillWait;
    * `timeout` bounds the whole run.
    Every stop says which worker caused it.
    """
    def say(message: str) -> None:
        print(f"distclip.cluster.launcher: {message}", file=log, flush=True)

    procs, status = _start(command, nproc, say)
    if status:
        return status
    send = functools.partial(_signal_all, procs)
    with Forwarding((signal.SIGINT, signal.SIGTERM), send) as signals:
        try:
            status = _supervise(procs, signals, timeout, grace, exit_wait, say)
            if status:
                terminate(send, lambda: any(p.poll() is None for p in procs), _stop_grace(status, signals, grace))
            for p in procs:
                p.wait()
            if not status:
                failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
                if failed:
                    rank, code = failed[0]
                    say(f"worker {rank} {exit_reason(code)}")
                    status = code if code > 0 else 128 - code
            if signals.first and not status:
                status = 128 + signals.first[0]
            return status
        finally:
            send(signal.SIGKILL)


def _signal_all(procs: List[subprocess.Popen], sig: int) -> None:
    """`sig` to every worker still running, and to its process group."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _start(command: Sequence[str], nproc: int, say: Callable[[str], None]) -> Tuple[List[subprocess.Popen], int]:
    """The `nproc` workers, each with its TF_CONFIG on localhost ports; or none and the status to exit with."""
    try:
        workers = [f"localhost:{p}" for p in free_ports(nproc, "127.0.0.1")]
    except OSError as e:
        say(f"cannot reserve {nproc} ports for the workers: {_why(e)}")
        return [], 2
    procs: List[subprocess.Popen] = []
    for i in range(nproc):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config))
        try:
            procs.append(subprocess.Popen(list(command), env=env, start_new_session=True))
        except OSError as e:
            say(f"worker {i} could not start: {_why(e)}; stopping the other {len(procs)} worker(s)")
            _signal_all(procs, signal.SIGKILL)
            for p in procs:
                p.wait()
            return [], 127
    return procs, 0


def _supervise(procs: List[subprocess.Popen], signals: Forwarding, timeout: Optional[float], grace: float,
               exit_wait: float, say: Callable[[str], None]) -> int:
    """Polls the workers until all exited (0) or one of `launch`'s reasons to stop them (its status)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting_since: dict = {}  # rank -> when it finished early or was first seen stopped
    while True:
        now = time.monotonic()
        codes = [p.poll() for p in procs]  # poll every worker: `any` would stop at the first live one
        if all(c is not None for c in codes):
            return 0
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            say(f"worker {rank} (pid {procs[rank].pid}) {exit_reason(code)}; "
                f"stopping the other {sum(c is None for c in codes)} worker(s)")
            return code if code > 0 else 128 - code
        if signals.first and signals.overdue(grace, now):
            say(f"workers still running {grace:g} s after {signal.Signals(signals.first[0]).name}: killing them")
            return 128 + signals.first[0]
        if deadline is not None and now > deadline:
            say(f"--timeout {timeout:g} s reached; stopping all workers")
            return 124
        for i, (p, c) in enumerate(zip(procs, codes, strict=True)):
            if c == 0 or (c is None and is_stopped(p.pid)):
                waiting_since.setdefault(i, now)
            elif c is None:
                waiting_since.pop(i, None)  # continued after a stop
        late = [i for i, t in waiting_since.items() if now > t + exit_wait]
        if late:
            rank = late[0]
            how = "exited with status 0" if codes[rank] == 0 else "is stopped (SIGSTOP) and does not answer"
            running = sum(c is None for c in codes) - (codes[rank] is None)
            say(f"worker {rank} (pid {procs[rank].pid}) {how} while {running} "
                f"other worker(s) still ran for {exit_wait:g} s (--exit-wait); stopping them")
            return 1
        time.sleep(0.1)


def _stop_grace(status: int, signals: Forwarding, grace: float) -> float:
    """How long the workers get between SIGTERM and SIGKILL: what is left of `grace` after the user's signal,
    all of it after `--timeout` (to checkpoint), at most 5 s after a failure (nothing useful can finish)."""
    if signals.first:
        return max(0.0, signals.first[1] + grace - time.monotonic())
    if status == 124:
        return grace
    return min(grace, FAILURE_GRACE_S)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distclip.cluster.launcher", description=__doc__.splitlines()[0],
                                usage="%(prog)s [--nproc N] [--timeout S] [--grace S] -- COMMAND [ARGS...]")
    p.add_argument("--nproc", type=int, default=2, help="number of workers (default 2)")
    p.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds between SIGTERM and SIGKILL when stopping workers (default 30, Slurm's KillWait)")
    p.add_argument("--exit-wait", type=float, default=50.0,
                   help="seconds the others may run on after a worker exited with status 0 or was stopped (default 50)")
    p.add_argument("--host-network", action="store_true",
                   help="run the workers in this machine's network namespace (by default they get a private one "
                        "with loopback only, since TensorFlow's gRPC servers listen on every interface)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    if args.nproc < 1:
        p.error(f"--nproc must be a positive integer; got {args.nproc}")
    for flag in ("timeout", "grace", "exit_wait"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            p.error(f"--{flag.replace('_', '-')} must be a number of seconds >= 0; got {value}")
    if not args.host_network:
        # Here, in the process that exists only to run the workers, not in `launch`, which a caller
        # could not undo: the namespace is this process's for good.
        isolate("distclip.cluster.launcher")
    return launch(command, args.nproc, args.timeout, args.grace, args.exit_wait)


if __name__ == "__main__":
    sys.exit(main())
