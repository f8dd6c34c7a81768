"""MultiWorkerMirroredStrategy with 2 local processes equals the single-device reference."""
import json
import os

import pytest

from common import check_multiworker_outputs
from procs import WORKERS, free_ports, python, run_all




def test_multiworker_under_mpirun_builds_its_tf_config(tmp_path):
    """No TF_CONFIG: each rank picks a free port and the ranks allgather host:port with mpi4py."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", python(),
           os.path.join(WORKERS, "multiworker_train.py"), str(tmp_path / "w{rank}.json"), "0.2", "4"]
    (r,) = run_all([cmd], [env], timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    check_multiworker_outputs([tmp_path / "w0.json", tmp_path / "w1.json"], 0.2, 4)


@pytest.mark.parametrize("clip_norm", [0.2])
def test_multiworker_matches_reference(tmp_path, clip_norm):
    steps = 4
    ports = free_ports(2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    commands, envs, outs = [], [], []
    for i in range(2):
        out = tmp_path / f"worker{i}.json"
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
        commands.append([python(), os.path.join(WORKERS, "multiworker_train.py"), str(out), str(clip_norm), str(steps)])
        envs.append(env)
        outs.append(out)
    results = run_all(commands, envs, timeout=240)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"worker {i} exited {r.returncode}:\n{r.stdout[-3000:]}"

    check_multiworker_outputs(outs, clip_norm, steps)
