"""A worker killed mid-training (SIGKILL): the run ends non-zero within 60 s, naming the lost peer; nothing hangs."""
import os
import re

import pytest

from procs import BOUND_S, ROOT, kill_rank_and_wait




@pytest.mark.parametrize(
    "script, strategy, message",
    [
        ("horovodrun-gloo.sh", "horovod", r"The first process to do so was:\s+Process name: 1\s+Exit code: 137"),
        ("horovodrun-mpi.sh", "horovod", r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9 \(Killed\)"),
        ("mpirun.sh", "horovod", r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9 \(Killed\)"),
        ("multiworker.sh", "multiworker", r"distclip.cluster.launcher: worker 1 \(pid \d+\) killed by SIGKILL; stopping the other 1 worker"),
    ],
)
def test_killed_worker_ends_the_run(tmp_path, script, strategy, message):
    env = dict(os.environ, NP="2", TF_CPP_MIN_LOG_LEVEL="2")
    code, elapsed, output = kill_rank_and_wait(tmp_path, [os.path.join(ROOT, "launch", script)], strategy, env)
    assert code != 0
    assert elapsed < BOUND_S, f"took {elapsed:.1f} s"
    assert re.search(message, output), output[-3000:]
