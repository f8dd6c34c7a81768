"""A worker killed mid-training (SIGKILL): the run ends non-zero within 60 s, naming the lost peer; nothing hangs."""
import os
import signal
import subprocess
import time

import psutil
import pytest

from distclip.cluster import info

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BOUND_S = 60


def _rank_process(launcher_pid: int, rank: int):
    """The descendant of the launcher that runs `distclip train` as `rank` (read from its launch environment)."""
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "distclip" in cmd and "train" in cmd and "horovodrun" not in cmd and "mpirun" not in cmd:
                i = info(p.environ())
                if i.size == 2 and i.rank == rank and i.launcher != "none":
                    return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _kill_one_and_wait(tmp_path, script, strategy):
    out = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w+")
    env = dict(os.environ, NP="2", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [os.path.join(ROOT, "launch", script), "distclip", "train", "--strategy", strategy,
           "--steps", "1000000", "--out", str(out)]
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        victim = survivor = None
        while time.monotonic() < deadline and launcher.poll() is None:
            csv = out / "metrics.csv"
            if csv.exists() and sum(1 for _ in open(csv)) > 20:  # training is under way
                victim, survivor = _rank_process(launcher.pid, 1), _rank_process(launcher.pid, 0)
                if victim and survivor:
                    break
            time.sleep(0.5)
        assert victim and survivor, f"training never started:\n{open(tmp_path / 'log.txt').read()[-3000:]}"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = launcher.wait(timeout=BOUND_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{script}: still running {BOUND_S + 30} s after rank 1 was killed")
        elapsed = time.monotonic() - killed_at
        psutil.wait_procs([survivor], timeout=10)
        assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE, "rank 0 outlived the launcher"
        log.seek(0)
        return code, elapsed, log.read()
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()
        log.close()


@pytest.mark.parametrize(
    "script, strategy, message",
    [
        ("horovodrun-gloo.sh", "horovod", r"The first process to do so was:\s+Process name: 1\s+Exit code: 137"),
        ("mpirun.sh", "horovod", r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9 \(Killed\)"),
        ("multiworker.sh", "multiworker", r"distclip.launcher: worker 1 \(pid \d+\) killed by SIGKILL; stopping the other 1 worker"),
    ],
)
def test_killed_worker_ends_the_run(tmp_path, script, strategy, message):
    import re

    code, elapsed, output = _kill_one_and_wait(tmp_path, script, strategy)
    assert code != 0
    assert elapsed < BOUND_S, f"took {elapsed:.1f} s"
    assert re.search(message, output), output[-3000:]
