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
