"""MultiWorkerMirroredStrategy under mpirun, with a TF_CONFIG built from the ranks, equals the single-device reference
(4 workers x 2 devices: tests/scenarios/test_eight_replicas.py; fit: test_fit_across_processes.py)."""
import os

from common import check_multiworker_outputs
from procs import WORKERS, python, run_all


def test_multiworker_under_mpirun_builds_its_tf_config(tmp_path):
    """No TF_CONFIG: each rank picks a free port and the ranks allgather host:port with mpi4py."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", python(),
           os.path.join(WORKERS, "multiworker_train.py"), str(tmp_path / "w{rank}.json"), "0.2", "4"]
    (r,) = run_all([cmd], [env], timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    check_multiworker_outputs([tmp_path / "w0.json", tmp_path / "w1.json"], 0.2, 4)
