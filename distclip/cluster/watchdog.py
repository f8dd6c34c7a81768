"""A watchdog around each rank's command, so that no rank waits forever for a peer that is gone.

    horovodrun -np 4 python -m distclip.cluster.watchdog -- python train.py
    mpirun -np 4 -x DISTCLIP_WATCHDOG_DIR python -m distclip.cluster.watchdog -- python train.py
    srun --kill-on-bad-exit=1 python -m distclip.cluster.watchdog -- python train.py

horovodrun, mpirun and srun end a job when a rank exits non-zero or is
killed, but not when a rank exits with status 0 before the others are done
(a wrapper that returns early), never starts, or is stopped (SIGSTOP): the
others then block in their next collective, forever under MPI. Each rank's
watchdog runs the command as its child and, once a second, writes the rank's
state to a file in a folder every rank shares (`DISTCLIP_WATCHDOG_DIR`; the
launch scripts and sbatch templates make one per run): a beat counter, and
"running", "stopped" (the child is in state T) or "exited CODE". It reads the
other ranks' files and stops its own command, and exits 1 naming the rank, when
another rank

* exited non-zero or was killed (at once);
* exited with status 0, is stopped, or stopped beating, for `--timeout`
  seconds (default 50) while this rank's command still runs;
* never wrote its file within `--timeout` seconds of this rank's start.

The launcher then ends the whole job, as it does for any failing rank. So
every such failure ends the run within `--timeout` + a few seconds.

SIGTERM, SIGINT and SIGHUP to the watchdog are passed to the command (after
SIGCONT), and whatever still runs `--grace` seconds later (default 30, Slurm's
KillWait) is killed. The command dies with the watchdog (PR_SET_PDEATHSIG),
and the watchdog ends as its command did: the same status, or the same signal.
On several machines the folder must be on a file system all of them share.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from distclip.cluster import info
from distclip.cluster.launcher import FAILURE_GRACE_S, describe, is_stopped

ENV_DIR = "DISTCLIP_WATCHDOG_DIR"
ENV_TIMEOUT = "DISTCLIP_WATCHDOG_TIMEOUT"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _write(path: str, beat: int, state: str) -> None:
    # Rewritten in place, fixed width: a reader on another machine reopens the same file and, with NFS's
    # close-to-open consistency, sees the newest contents (a renamed new file could hide behind a cached name).
    with open(path, "r+" if os.path.exists(path) else "w") as f:
        f.write(f"{beat:012d} {state:<16}\n")


def _read(path: str) -> Optional[Tuple[str, str]]:
    """(beat, state) from a rank's file, or None if it has not written one (or it is being written)."""
    try:
        with open(path) as f:
            beat, _, state = f.read().partition(" ")
    except FileNotFoundError:
        return None
    return (beat, state.strip()) if beat.isdigit() and state.endswith("\n") else ("", "")  # ("", ""): mid-write


def _clean(folder: str, size: int) -> None:
    """Removes the folder once every rank has exited (the last one out does it)."""
    states = [_read(os.path.join(folder, f"rank-{r}")) for r in range(size)]
    if all(s is not None and s[1].startswith("exited ") for s in states):
        shutil.rmtree(folder, ignore_errors=True)


class Peers:
    """What this rank knows of the others: when each last changed, and for how long it has been in a bad state."""

    def __init__(self, folder: str, me: int, size: int):
        self.folder, self.me = folder, me
        self.others = [r for r in range(size) if r != me]
        self.seen: Dict[int, Tuple[str, str]] = {}
        self.changed: Dict[int, float] = {}
        self.since: Dict[int, Tuple[str, float]] = {}  # rank -> (state, when first seen in it)

    def problem(self, now: float, started: float, timeout: float) -> Optional[str]:
        """Why this rank should stop, naming the peer; None while every peer is well or waited for."""
        for r in self.others:
            got = _read(os.path.join(self.folder, f"rank-{r}"))
            if got == ("", ""):
                continue
            if got is None:
                if now - started > timeout:
                    return f"rank {r} never started (no state in {self.folder} {timeout:g} s after this rank began)"
                continue
            if got != self.seen.get(r):
                self.seen[r], self.changed[r] = got, now
            beat, state = got
            if state.startswith("exited "):
                code = int(state.split()[1])
                if code != 0:
                    return f"rank {r} {describe(code)}"
            bad = state if state == "stopped" or state.startswith("exited ") else None
            if bad is None:
                self.since.pop(r, None)
            elif self.since.get(r, (None,))[0] != bad:
                self.since[r] = (bad, now)
            if bad and now - self.since[r][1] > timeout:
                how = "exited with status 0" if bad.startswith("exited") else "is stopped (SIGSTOP) and does not answer"
                return f"rank {r} {how} while this rank still ran for {timeout:g} s"
            if not bad and now - self.changed[r] > timeout:
                return f"rank {r} stopped answering (no heartbeat for {timeout:g} s)"
        return None


def watch(command: List[str], folder: str, timeout: float = 50.0, grace: float = 30.0, log=sys.stderr) -> int:
    """Runs `command` as this rank's child under the watchdog; returns its status (-N if killed by signal N)."""
    me = info()
    who = f"distclip.watchdog (rank {me.rank})"
    os.makedirs(folder, exist_ok=True)
    mine = os.path.join(folder, f"rank-{me.rank}")
    beat = 0
    try:
        child = subprocess.Popen(command, preexec_fn=_die_with_parent)
    except OSError as e:
        print(f"{who}: could not start {command[0]!r}: {e}", file=log, flush=True)
        _write(mine, 0, "exited 127")
        return 127

    received: List[Tuple[int, float]] = []

    def forward(signum, _frame):
        received.append((signum, time.monotonic()))
        for sig in (signal.SIGCONT, signum):
            try:
                child.send_signal(sig)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    peers = Peers(folder, me.rank, me.size)
    started = time.monotonic()
    try:
        while child.poll() is None:
            now = time.monotonic()
            beat += 1
            _write(mine, beat, "stopped" if is_stopped(child.pid) else "running")
            if received and now > received[0][1] + grace:
                print(f"{who}: still running {grace:g} s after {signal.Signals(received[0][0]).name}; killing it",
                      file=log, flush=True)
                child.kill()
                break
            why = None if received else peers.problem(now, started, timeout)
            if why:
                print(f"{who}: {why}; stopping this rank", file=log, flush=True)
                _write(mine, beat + 1, "exited 1")  # first: the others must not wait on this rank either
                _stop(child, min(grace, FAILURE_GRACE_S))
                _clean(folder, me.size)
                return 1
            try:
                child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        code = child.wait()
        _write(mine, beat + 1, f"exited {code}")
        _clean(folder, me.size)
        return code
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.kill()
            child.wait()


def _stop(child: subprocess.Popen, grace: float) -> None:
    for sig in (signal.SIGCONT, signal.SIGTERM):
        child.send_signal(sig)
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distclip.cluster.watchdog", description=__doc__.splitlines()[0],
                                usage="%(prog)s [--dir DIR] [--timeout S] [--grace S] -- COMMAND [ARGS...]")
    p.add_argument("--dir", default=os.environ.get(ENV_DIR),
                   help=f"the folder every rank shares for this run (default: ${ENV_DIR})")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds a peer may be gone, stopped or silent (default: ${ENV_TIMEOUT}, else 50)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds between a forwarded SIGTERM and SIGKILL (default 30)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    if args.timeout is None:
        text = os.environ.get(ENV_TIMEOUT, "50")
        try:
            args.timeout = float(text)
        except ValueError:
            p.error(f"{ENV_TIMEOUT} must be a number of seconds > 0; got {ENV_TIMEOUT}={text!r}")
    if not args.dir:
        p.error(f"give --dir or set {ENV_DIR}: a folder every rank of this run shares, and no other run")
    for flag in ("timeout", "grace"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag} (or {ENV_TIMEOUT}) must be a number of seconds > 0; got {getattr(args, flag)}"
                    if flag == "timeout" else f"--{flag} must be a number of seconds > 0; got {getattr(args, flag)}")
    code = watch(command, args.dir, args.timeout, args.grace)
    if code < 0:
        # End as the command did, killed by the same signal, so the launcher reports it ("exited on signal 9").
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
