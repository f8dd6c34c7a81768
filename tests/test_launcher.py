"""distclip.launcher: TF_CONFIG per worker, exit statuses, signal forwarding, timeout. Tiny Python workers, no TF."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # starts processes

LAUNCHER = [sys.executable, "-m", "distclip.launcher"]


def test_each_worker_gets_its_tf_config(tmp_path):
    code = ("import json, os, sys; c = json.loads(os.environ['TF_CONFIG']); "
            f"open(os.path.join({str(tmp_path)!r}, str(c['task']['index'])), 'w').write(json.dumps(c))")
    r = subprocess.run(LAUNCHER + ["--nproc", "3", "--", sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0
    configs = [json.loads((tmp_path / str(i)).read_text()) for i in range(3)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("localhost:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"]["worker"] == workers for c in configs)


def test_a_failing_worker_stops_the_others():
    code = ("import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
            "time.sleep(0.5) if i == 1 else time.sleep(300); sys.exit(7)")
    start = time.monotonic()
    r = subprocess.run(LAUNCHER + ["--nproc", "2", "--grace", "2", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7
    assert "worker 1 (pid" in r.stderr and "exited with status 7; stopping the other 1 worker(s)" in r.stderr
    assert time.monotonic() - start < 20


def test_signals_are_forwarded_and_timeout_bounds_the_run(tmp_path):
    code = ("import signal, sys, time, os; "
            f"signal.signal(signal.SIGTERM, lambda *a: (open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w'), sys.exit(3))); "
            "time.sleep(300)")
    p = subprocess.Popen(LAUNCHER + ["--nproc", "2", "--", sys.executable, "-c", code],
                         stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) != 0
    assert len(os.listdir(tmp_path)) == 2, "both workers received SIGTERM"

    r = subprocess.run(LAUNCHER + ["--nproc", "2", "--timeout", "2", "--grace", "1", "--", sys.executable, "-c",
                                   "import time; time.sleep(300)"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 124 and "--timeout 2 s reached" in r.stderr


# Workers that ignore SIGTERM, as a TensorFlow worker blocked in a collective effectively does.
_STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); "
_RANK = "import json, os; rank = json.loads(os.environ['TF_CONFIG'])['task']['index']; "


def _launch(args, code, **kwargs):
    start = time.monotonic()
    r = subprocess.run(LAUNCHER + args + ["--", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=90, **kwargs)
    return r, time.monotonic() - start


@pytest.mark.parametrize("worker_1, message", [
    ("rank == 1 or time.sleep(300)", "exited with status 0 while 1 other worker(s) still ran for 2 s"),
    ("rank == 1 and os.kill(os.getpid(), signal.SIGSTOP); time.sleep(300)", "is stopped (SIGSTOP) and does not answer"),
], ids=["exits early with status 0", "stopped"])
def test_a_worker_the_others_would_wait_for_forever_ends_the_run(worker_1, message):
    r, took = _launch(["--nproc", "2", "--exit-wait", "2", "--grace", "1"], _STUBBORN + _RANK + worker_1)
    assert r.returncode == 1, r.stderr
    assert "worker 1 (pid" in r.stderr and message in r.stderr
    assert took < 30


def test_sigterm_escalates_to_sigkill_after_the_grace_period():
    p = subprocess.Popen(LAUNCHER + ["--nproc", "2", "--grace", "2", "--", sys.executable, "-c",
                                     _STUBBORN + "time.sleep(300)"], stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 15
    assert "workers still running 2 s after SIGTERM: killing them" in p.stderr.read()


def test_a_worker_that_cannot_start_is_named():
    r = subprocess.run(LAUNCHER + ["--nproc", "2", "--", "/nonexistent/python"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 127 and "worker 0 could not start" in r.stderr
