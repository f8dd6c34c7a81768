"""distclip.cluster.env: this process's place in the job from each launcher's variables.

Real launches are in tests/scenarios/."""
import pytest

from distclip.cluster import ClusterInfo, info


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, ClusterInfo(0, 1, 0, 1, "none")),
        ({"HOROVOD_RANK": "3", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"},
         ClusterInfo(3, 4, 1, 2, "horovodrun")),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ClusterInfo(1, 2, 1, 2, "mpirun")),
        ({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
          "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}, ClusterInfo(6, 7, 0, 1, "slurm")),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "a:2", "b:1"]}, "task": {"type": "worker", "index": 1}}'},
         ClusterInfo(1, 3, 1, 2, "tf_config")),
        ({"TF_CONFIG": '{"cluster": {"chief": ["a:0"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}'},
         ClusterInfo(1, 2, 0, 1, "tf_config")),
    ],
)
def test_info_from_launcher_environment(env, want):
    assert info(env) == want
