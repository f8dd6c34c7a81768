"""`pytest --file-times`: where the suite's time goes, per test file and per kind of process the tests start.

A pytest plugin (tests/conftest.py loads it). With the option, every process a test starts through `subprocess`
is classified by its command line (`kind`), and the end of the run prints two tables: seconds per test file
(setup, call and teardown summed, with the file's tier and number of tests), and seconds per kind of process,
where each test counts under the costliest kind it started. Works under pytest-xdist too: the kinds travel to
the controller in each report's `user_properties`.
"""
from __future__ import annotations

import os
import subprocess
from typing import Dict, List, Sequence, Union

import pytest

#: Kinds of process, costliest first; a test that starts several counts under the first of them.
KINDS = ("Slurm job", "horovodrun/mpirun job", "launcher", "venv/pip/build", "Python (TensorFlow) process",
         "other process", "no process")

_started: List[str] = []  # the kinds started by the test running in this process
_by_file: Dict[str, List[float]] = {}  # file -> [seconds, tests, slow tests]
_by_kind: Dict[str, List[float]] = {}  # kind -> [seconds, tests, processes]
_seconds: Dict[str, float] = {}  # a test's seconds until its teardown report, which carries the kinds


def kind(args: Union[str, Sequence[str]]) -> str:
    """The kind of process a command line starts (see KINDS)."""
    words = args.split() if isinstance(args, str) else [str(a) for a in args]
    names = [os.path.basename(w) for w in words]
    while names and names[0] in ("bash", "sh", "env", "setsid"):
        names.pop(0)
    first = names[0] if names else ""
    if first in ("sbatch", "srun", "salloc", "scancel", "scontrol", "squeue", "sinfo", "slurmctld", "slurmd",
                 "munged", "mungekey") or first.endswith(".sbatch"):
        return "Slurm job"
    if first in ("horovodrun", "mpirun", "mpiexec", "horovodrun.sh", "mpirun.sh"):
        return "horovodrun/mpirun job"
    if first == "multiworker.sh" or "distclip.cluster.launcher" in words:
        return "launcher"
    if "venv" in words or "pip" in words or "build" in words or first in ("pip", "install-horovod.sh"):
        return "venv/pip/build"
    if first.startswith("python") or first == "distclip":
        return "Python (TensorFlow) process"
    return "other process"


_popen_init = subprocess.Popen.__init__


def _recording_init(self, args, *rest, **kwargs):
    _started.append(kind(args))
    _popen_init(self, args, *rest, **kwargs)


def pytest_addoption(parser):
    parser.addoption("--file-times", action="store_true",
                     help="print where the time went: seconds per test file (setup, call and teardown summed), "
                          "slowest first, with each file's tier and number of tests; and seconds per kind of "
                          "process the tests start")


def pytest_configure(config):
    if config.getoption("--file-times"):
        subprocess.Popen.__init__ = _recording_init


def pytest_unconfigure(config):
    subprocess.Popen.__init__ = _popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "teardown" and item.config.getoption("--file-times"):
        item.user_properties.append(("processes", list(_started)))  # before the report copies the list
        _started.clear()
    yield


def pytest_runtest_logreport(report):
    entry = _by_file.setdefault(report.nodeid.split("::")[0], [0.0, 0, 0])
    entry[0] += report.duration
    if report.when == "call" or (report.when == "setup" and report.skipped):
        entry[1] += 1
        entry[2] += "slow" in report.keywords
    started = dict(report.user_properties).get("processes")
    seconds = _seconds.pop(report.nodeid, 0.0) + report.duration
    if started is None:
        _seconds[report.nodeid] = seconds
        return
    costliest = min((KINDS.index(k) for k in started), default=KINDS.index("no process"))
    row = _by_kind.setdefault(KINDS[costliest], [0.0, 0, 0])
    row[0] += seconds
    row[1] += 1
    row[2] += len(started)



def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--file-times") or not _by_file:
        return
    write = terminalreporter.write_line
    total = sum(seconds for seconds, _, _ in _by_file.values())
    terminalreporter.section("seconds per file")
    write(f"{'seconds':>8} {'share':>6} {'tests':>5}  {'tier':<8} file")
    for path, (seconds, tests, slow) in sorted(_by_file.items(), key=lambda kv: -kv[1][0]):
        tier = "scenario" if slow == tests else "unit" if not slow else "mixed"
        write(f"{seconds:8.1f} {seconds / total:6.1%} {tests:5d}  {tier:<8} {path}")
    write(f"{total:8.1f} {1:6.0%} {sum(t for _, t, _ in _by_file.values()):5d}  total")
    terminalreporter.section("seconds per kind of process started (a test counts under the costliest it started)")
    write(f"{'seconds':>8} {'share':>6} {'tests':>5} {'started':>7}  kind")
    for name in KINDS:
        if name in _by_kind:
            seconds, tests, started = _by_kind[name]
            write(f"{seconds:8.1f} {seconds / total:6.1%} {tests:5d} {started:7d}  {name}")
    terminalreporter.write_line("(seconds are summed over tests; under pytest-xdist they add up to more than the "
                                "wall time)")
