"""distclip.cluster.watchdog: a rank that exits early with status 0, never starts, or is stopped ends the run, named.

Real horovodrun and mpirun launches (through launch/horovodrun.sh and launch/mpirun.sh) of tiny Python ranks
that ignore SIGTERM; srun is in test_slurm.py. And the peer rules alone, on files.
"""
import os
import re
import subprocess
import sys
import time

import pytest
from procs import ROOT, WORKERS

STUBBORN = os.path.join(WORKERS, "stubborn.py")
TIMEOUT_S = 3

CASES = {
    "exits-early-with-status-0": ("exit0", r"rank 1 exited with status 0 while this rank still ran for 3 s"),
    "stopped": ("stop", r"rank 1 is stopped \(SIGSTOP\) and does not answer while this rank still ran for 3 s"),
}


def watchdog_env(tmp_path):
    return dict(os.environ, NP="2", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, TMPDIR=str(tmp_path),
                DISTCLIP_WATCHDOG_TIMEOUT=str(TIMEOUT_S))


def run_bounded(cmd, env, bound=60):
    start = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=bound + 60, start_new_session=True)
    return r.returncode, time.monotonic() - start, r.stdout + r.stderr


# Each failure mode under one launch script, each script with one mode (the rules themselves: unit/cluster/
# test_watchdog.py; both modes under srun: test_slurm.py).
@pytest.mark.parametrize("case, script", [("exits-early-with-status-0", "mpirun.sh"), ("stopped", "horovodrun.sh")])
def test_a_rank_the_others_would_wait_for_forever_ends_the_run(tmp_path, script, case):
    mode, message = CASES[case]
    code, took, output = run_bounded([os.path.join(ROOT, "launch", script), sys.executable, STUBBORN, mode],
                                     watchdog_env(tmp_path))
    assert code != 0 and took < 40, (code, took, output[-3000:])
    assert re.search(r"distclip\.cluster\.watchdog \(rank 0\): " + message + "; stopping this rank", output), output[-3000:]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".distclip-watchdog")], "the folder is left"


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_a_rank_that_never_starts_ends_the_run(tmp_path, launcher):
    env = watchdog_env(tmp_path)
    env.update(DISTCLIP_WATCHDOG_DIR=str(tmp_path), DISTCLIP_WATCHDOG_RUN="never-starts")
    # Rank 1 hangs before its watchdog starts (a wrapper stuck on a slow file system, say).
    rank = "${HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}"
    wrapped = ["sh", "-c", f'[ "{rank}" = 1 ] && exec sleep 300; exec "$0" -m distclip.cluster.watchdog -- "$0" {STUBBORN} none',
               sys.executable]
    bin_dir = os.path.dirname(sys.executable)
    cmd = {"horovodrun": [os.path.join(bin_dir, "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"],
           "mpirun": ["mpirun", "-np", "2", "--oversubscribe", "-x", "DISTCLIP_WATCHDOG_DIR", "-x", "DISTCLIP_WATCHDOG_RUN", "-x",
                      "DISTCLIP_WATCHDOG_TIMEOUT", "-x", "PYTHONPATH"]}[launcher]
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    code, took, output = run_bounded([sys.executable, "-m", "distclip.cluster.netns"] + cmd + wrapped, env)
    assert code != 0 and took < 40, (code, took, output[-3000:])
    assert "distclip.cluster.watchdog (rank 0): rank 1 never started (no state in" in output, output[-3000:]
