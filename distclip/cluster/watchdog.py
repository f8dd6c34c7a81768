"""A watchdog around each rank's command, so that no rank waits forever for a peer that is gone.

    horovodrun -np 4 python -m distclip.cluster.watchdog -- python train.py
    mpirun -np 4 -x DISTCLIP_WATCHDOG_DIR python -m distclip.cluster.watchdog -- python train.py
    srun --kill-on-bad-exit=1 python -m distclip.cluster.watchdog -- python train.py

horovodrun, mpirun and srun end a job when a rank exits non-zero or is
killed, but not when a rank exits with status 0 before the others are done
(a wrapper that returns early), never starts, or is stopped (SIGSTOP): the
others then block in their next collective, forever under MPI. Each rank's
watchdog runs the command as its child and, once a second, writes the rank's
state to a file in a folder every rank shares: a beat counter, and "running",
"stopped" (the child is in state T) or "exited CODE". It reads the other ranks'
files and stops its own command, and exits 1 naming the rank, when another rank

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

The folder is the watchdog's own: `.distclip-watchdog-RUN` inside the parent
folder `DISTCLIP_WATCHDOG_DIR` (`--dir`), where RUN (`DISTCLIP_WATCHDOG_RUN`,
`--run`; under srun by default `slurm-JOBID.STEPID`) names this run and is the
same on every rank. The first rank creates it with mode 0700; a folder of that
name that is not a folder of this user's with mode 0700 (a symbolic link,
another user's, readable by others) is refused, and so is a parent that every
user may write to without the sticky bit. State files are opened without
following symbolic links. When every rank has exited, the last one out removes
the ranks' state files and then the folder if it is empty: nothing else in the
parent, or in the folder, is touched. On several machines the parent must be
on a file system all of them share.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from distclip.cluster import info
from distclip.cluster.supervision import FAILURE_GRACE_S, Forwarding, exit_reason, is_stopped, terminate

ENV_DIR = "DISTCLIP_WATCHDOG_DIR"
ENV_TIMEOUT = "DISTCLIP_WATCHDOG_TIMEOUT"
ENV_RUN = "DISTCLIP_WATCHDOG_RUN"
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WatchdogError(Exception):
    """The watchdog cannot run safely: the message names the path or value and what to do."""


def default_run() -> Optional[str]:
    """The run's name where the launcher gives one that every rank shares: `slurm-JOBID.STEPID` under srun."""
    job, step = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_STEP_ID", "")
    return f"slurm-{job}.{step}" if job.isdigit() and step.isdigit() else None


def make_folder(parent: str, run: str) -> str:
    """Creates (or, on the other ranks, checks) this run's private folder `.distclip-watchdog-RUN` in `parent`.

    Args:
      parent: an existing folder every rank shares (`DISTCLIP_WATCHDOG_DIR`).
      run: this run's name, the same on every rank (`DISTCLIP_WATCHDOG_RUN`).

    Returns:
      The folder's path.

    Raises:
      WatchdogError: `run` is not a plain name; `parent` is missing, not a folder, or writable by every user
        without the sticky bit; the folder cannot be created, or exists and is not this user's with mode 0700.
    """
    if not _RUN_NAME.fullmatch(run):
        raise WatchdogError(f"{ENV_RUN} (--run) must be a name of letters, digits, '.', '_' and '-' (at most 128, "
                            f"not starting with '.' or '-'); got {run!r}")
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise WatchdogError(f"{ENV_DIR} (--dir) {parent!r} does not exist; give an existing folder that every rank "
                            "of this run shares") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WatchdogError(f"{ENV_DIR} (--dir) {parent!r} is not a folder; give an existing folder that every "
                            "rank of this run shares")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise WatchdogError(f"{ENV_DIR} (--dir) {parent!r} may be written by every user and has no sticky bit "
                            "(another user could replace the watchdog's folder); give a folder of your own")
    folder = os.path.join(parent, f".distclip-watchdog-{run}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass  # another rank made it first, or somebody else did: checked below
    except OSError as e:
        raise WatchdogError(f"cannot create the watchdog's folder {folder}: {e.strerror}; set {ENV_DIR} to a "
                            "folder this user can write that every rank of this run shares") from None
    st = os.lstat(folder)
    why = ("is not a folder (a symbolic link or a file)" if not stat.S_ISDIR(st.st_mode) else
           f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})" if st.st_uid != os.geteuid() else
           f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700" if st.st_mode & 0o077 else None)
    if why:
        raise WatchdogError(f"refusing the watchdog's folder {folder}: it {why}, so it is not this run's own; "
                            f"give this run another {ENV_RUN}, or remove it if it is a stale one of yours")
    return folder


def _refusal(action: str, path: str, e: OSError) -> WatchdogError:
    why = "it is a symbolic link, which the watchdog never follows" if e.errno == errno.ELOOP else e.strerror
    return WatchdogError(f"cannot {action} {path}: {why}")


def _write(path: str, beat: int, state: str) -> None:
    # Rewritten in place, fixed width: a reader on another machine reopens the same file and, with NFS's
    # close-to-open consistency, sees the newest contents (a renamed new file could hide behind a cached name).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise _refusal("write", path, e) from None
    try:
        os.pwrite(fd, f"{beat:012d} {state:<16}\n".encode(), 0)
    finally:
        os.close(fd)


def _read(path: str) -> Optional[Tuple[str, str]]:
    """(beat, state) from a rank's file, or None if it has not written one (or it is being written)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _refusal("read", path, e) from None
    try:
        beat, _, state = os.read(fd, 64).decode(errors="replace").partition(" ")
    finally:
        os.close(fd)
    return (beat, state.strip()) if beat.isdigit() and state.endswith("\n") else ("", "")  # ("", ""): mid-write


def _clean(folder: str, size: int) -> None:
    """Once every rank has exited (the last one out does it): removes their state files, then the folder if empty."""
    files = [os.path.join(folder, f"rank-{r}") for r in range(size)]
    states = [_read(f) for f in files]
    if all(s is not None and s[1].startswith("exited ") for s in states):
        for f in files:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (somebody put something there), or already gone


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
                    return f"rank {r} {exit_reason(code)}"
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


def watch(command: List[str], parent: str, run: str, timeout: float = 50.0, grace: float = 30.0,
          log=sys.stderr) -> int:
    """Runs `command` as this rank's child under the watchdog, in the folder `make_folder(parent, run)`.

    Returns:
      The command's status (-N if killed by signal N); 1 if a peer failed or the state files could not be used.

    Raises:
      WatchdogError: from `make_folder`, before the command starts.
    """
    me = info()
    who = f"distclip.cluster.watchdog (rank {me.rank})"
    folder = make_folder(parent, run)
    mine = os.path.join(folder, f"rank-{me.rank}")
    _write(mine, 0, "running")  # before the command starts: a refused state file stops the rank, not a run
    try:
        child = subprocess.Popen(command, preexec_fn=_die_with_parent)
    except OSError as e:
        print(f"{who}: could not start {command[0]!r}: {e}", file=log, flush=True)
        _write(mine, 0, "exited 127")
        return 127

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)

    with Forwarding((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), send) as signals:
        try:
            beat, why = _beat(child, mine, Peers(folder, me.rank, me.size), signals, timeout, grace, who, log)
            if why:
                print(f"{who}: {why}; stopping this rank", file=log, flush=True)
                with contextlib.suppress(WatchdogError):  # already reported: how this rank ends is decided
                    _write(mine, beat + 1, "exited 1")  # first: the others must not wait on this rank either
                terminate(send, lambda: child.poll() is None, min(grace, FAILURE_GRACE_S))
                child.wait()
                with contextlib.suppress(WatchdogError):
                    _clean(folder, me.size)
                return 1
            code = child.wait()
            with contextlib.suppress(WatchdogError):  # the command's status decides how this rank ends
                _write(mine, beat + 1, f"exited {code}")
                _clean(folder, me.size)
            return code
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _beat(child: subprocess.Popen, mine: str, peers: Peers, signals: Forwarding, timeout: float, grace: float,
          who: str, log) -> Tuple[int, Optional[str]]:
    """Once a second while the command runs: this rank's state written, the peers' read. Returns the last beat
    and why this rank must stop (None: the command ended, or was killed `grace` s after a forwarded signal)."""
    beat, started = 0, time.monotonic()
    while child.poll() is None:
        now = time.monotonic()
        beat += 1
        try:
            _write(mine, beat, "stopped" if is_stopped(child.pid) else "running")
            why = None if signals.first else peers.problem(now, started, timeout)
        except WatchdogError as e:
            why = str(e)
        if signals.first and signals.overdue(grace, now):
            print(f"{who}: still running {grace:g} s after {signal.Signals(signals.first[0]).name}; killing it",
                  file=log, flush=True)
            child.kill()
            return beat, None
        if why:
            return beat, why
        try:
            child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    return beat, None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distclip.cluster.watchdog", description=__doc__.splitlines()[0],
                                usage="%(prog)s [--dir DIR] [--run NAME] [--timeout S] [--grace S] "
                                      "-- COMMAND [ARGS...]")
    p.add_argument("--dir", default=os.environ.get(ENV_DIR),
                   help=f"an existing folder every rank shares, in which the watchdog makes its own "
                        f"(default: ${ENV_DIR})")
    p.add_argument("--run", default=os.environ.get(ENV_RUN) or default_run(),
                   help=f"this run's name, the same on every rank (default: ${ENV_RUN}; under srun slurm-JOBID.STEPID)")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds a peer may be gone, stopped or silent (default: ${ENV_TIMEOUT}, else 50)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds between a forwarded SIGTERM and SIGKILL (default 30)")
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
        p.error(f"give --dir or set {ENV_DIR}: an existing folder every rank of this run shares; the watchdog "
                "makes its own folder inside it")
    if not args.run:
        p.error(f"give --run or set {ENV_RUN}: a name for this run, the same on every rank and unique to the run "
                "(the launch scripts and sbatch templates set one; under srun it defaults to slurm-JOBID.STEPID)")
    for flag in ("timeout", "grace"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag} (or {ENV_TIMEOUT}) must be a number of seconds > 0; got {getattr(args, flag)}"
                    if flag == "timeout" else f"--{flag} must be a number of seconds > 0; got {getattr(args, flag)}")
    try:
        code = watch(command, args.dir, args.run, args.timeout, args.grace)
    except WatchdogError as e:
        print(f"distclip.cluster.watchdog (rank {info().rank}): {e}", file=sys.stderr, flush=True)
        return 2
    if code < 0:
        # End as the command did, killed by the same signal, so the launcher reports it ("exited on signal 9").
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
