"""distclip._moved: module paths from before distclip/cluster/ and distclip/train/ still import, as the same modules."""
import importlib
import subprocess
import sys

import pytest

import distclip
from distclip._moved import MOVED


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_path_is_the_new_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    assert getattr(distclip, old.rsplit(".", 1)[1]) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new


def test_python_m_old_path_runs_the_new_module_without_tensorflow():
    code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module('distclip.watchdog', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'tensorflow' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "python -m distclip.cluster.watchdog" in r.stdout  # the new module's own usage line
    r = subprocess.run([sys.executable, "-m", "distclip.launcher", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--nproc" in r.stdout, r.stderr
