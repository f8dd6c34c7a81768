"""distclip.cluster.env: this process's place in the job from each launcher's variables.

Real launches are in tests/scenarios/."""
import pytest

from distclip.cluster import ClusterInfo, info
from distclip._src.errors import ContextError


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


@pytest.mark.parametrize("env, message", [
    ({"TF_CONFIG": "[]"}, 'TF_CONFIG must be a JSON object with a "cluster" object and a "task" object; got TF_CONFIG=\'[]\''),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}, 'a "task" object'),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}'},
     'task["index"] must be a whole number from 0 to 0; got 1'),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "a:2"]}, "task": {"type": "worker", "index": -1}}'},
     'task["index"] must be a whole number from 0 to 1; got -1'),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "a:2"]}, "task": {"type": "worker", "index": "1"}}'},
     "got '1'"),
    ({"TF_CONFIG": '{"cluster": {"worker": "localhost:1234"}, "task": {"type": "worker", "index": 0}}'},
     'cluster["worker"] must be a list of "host:port" strings'),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}'}, "got 'ps'"),
    ({"TF_CONFIG": "{"}, "TF_CONFIG is not valid JSON"),
    ({"HOROVOD_RANK": "--2"}, "HOROVOD_RANK must be a whole number >= 0; got HOROVOD_RANK='--2'"),
    ({"HOROVOD_RANK": "-1", "HOROVOD_SIZE": "2"}, "HOROVOD_RANK must be a whole number >= 0; got HOROVOD_RANK='-1'"),
    ({"HOROVOD_RANK": "2", "HOROVOD_SIZE": "2"}, "inconsistent horovodrun variables HOROVOD_RANK, HOROVOD_SIZE"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "abc"},
     "OMPI_COMM_WORLD_SIZE must be a whole number >= 1; got OMPI_COMM_WORLD_SIZE='abc'"),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "2"}, "inconsistent slurm variables SLURM_PROCID"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_NTASKS must be a whole number >= 1; got SLURM_NTASKS='0'"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "-4"}, "SLURM_NTASKS must be a whole number >= 1; got SLURM_NTASKS='-4'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "0(x0)"},
     "cannot parse SLURM_STEP_TASKS_PER_NODE='0(x0)'"),
])
def test_malformed_launcher_variables_are_refused_naming_them(env, message):
    with pytest.raises(ContextError) as e:
        info(env)
    assert message in str(e.value)
