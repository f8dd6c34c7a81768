"""Starting worker processes for tests: free ports, bounded waits, nothing left running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import List, Sequence

import psutil
import pytest

from distclip.cluster import free_ports, info  # noqa: F401  (free_ports: for the tests)

#: tests/, the repository's root, and the worker scripts the scenarios start.
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKERS = os.path.join(TESTS, "workers")

#: A killed worker must end the whole run within this many seconds.
BOUND_S = 60


def require(*programs: str, modules: Sequence[str] = ()) -> None:
    """Fails the test, saying to run scripts/setup.sh, where a program or Python module it needs is missing."""
    import importlib.util
    import shutil

    missing = [p for p in programs if shutil.which(p) is None]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/setup.sh, which installs everything the tests use")


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


def rank_process(marker: str, rank: int):
    """The process running `distclip train` as `rank` of 2 whose command line contains `marker`.

    Searched machine-wide: srun's tasks are children of slurmstepd, not of srun.
    The rank is read from the process's own launch environment.
    """
    for p in psutil.process_iter():
        try:
            args = p.cmdline()
            # The Python process itself: [python, .../distclip, train, ...] (not a shell, srun, mpirun or horovodrun).
            if len(args) > 2 and args[1].endswith("distclip") and args[2] == "train" and marker in " ".join(args):
                i = info(p.environ())
                if i.size == 2 and i.rank == rank and i.launcher != "none":
                    return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def kill_rank_and_wait(tmp_path, launcher_cmd: List[str], strategy: str, env: dict):
    """Starts `launcher_cmd distclip train --strategy STRATEGY ...`, SIGKILLs rank 1 once training is
    under way, and waits (bounded) for the launcher to end. Returns (exit code, seconds after the kill, output)."""
    out = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w+", errors="replace")
    cmd = launcher_cmd + ["distclip", "train", "--strategy", strategy, "--steps", "1000000", "--out", str(out)]
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        victim = survivor = None
        while time.monotonic() < deadline and launcher.poll() is None:
            csv = out / "metrics.csv"
            if csv.exists() and sum(1 for _ in open(csv)) > 20:  # training is under way
                victim, survivor = rank_process(str(out), 1), rank_process(str(out), 0)
                if victim and survivor:
                    break
            time.sleep(0.5)
        assert victim and survivor, f"training never started:\n{open(tmp_path / 'log.txt', errors='replace').read()[-3000:]}"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = launcher.wait(timeout=BOUND_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd[0]}: still running {BOUND_S + 30} s after rank 1 was killed")
        elapsed = time.monotonic() - killed_at
        gone, alive = psutil.wait_procs([survivor], timeout=15)
        assert not alive, "rank 0 outlived its launcher"
        log.seek(0)
        return code, elapsed, log.read()
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()
        log.close()
