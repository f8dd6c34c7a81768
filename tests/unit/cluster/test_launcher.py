"""distclip.cluster.launcher: what one process can check (real launches: tests/scenarios/test_launcher.py)."""
import subprocess
import sys

from procs import ROOT


def test_too_many_workers_for_the_open_file_limit_is_named():
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "from distclip.cluster.launcher import main; sys.exit(main(['--nproc', '200', '--', 'true']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert ("distclip.cluster.launcher: cannot reserve 200 ports for the workers: too many open files (this process may "
            "open 64, `ulimit -n`; each worker needs a few): raise the limit or start fewer workers") in r.stderr
