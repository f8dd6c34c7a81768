"""Cluster helpers: launch environments (real launches are in test_horovod/test_multiworker/test_slurm), checksums."""
import numpy as np
import pytest
import tensorflow as tf

import distclip
from distclip.cluster import ClusterInfo, info
from distclip.verify import checksum


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


def test_checksum_sees_every_bit_and_order():
    a = tf.constant(np.arange(10, dtype="float32"))
    assert int(checksum(a)) == int(checksum(tf.identity(a)))
    nudged = a.numpy().copy()
    nudged[3] = np.nextafter(nudged[3], np.float32(10))
    swapped = a.numpy()[[1, 0] + list(range(2, 10))]
    assert int(checksum(tf.constant(nudged))) != int(checksum(a))
    assert int(checksum(tf.constant(swapped))) != int(checksum(a))
    for dtype in (tf.float16, tf.bfloat16, tf.float64, tf.int64):
        assert checksum(tf.cast(a, dtype)).dtype == tf.int64


def test_verify_replicas_under_mirrored(mirrored):
    with mirrored.scope():
        v = tf.Variable(np.arange(6, dtype="float32"), name="v")
        w = tf.Variable(np.ones(3, "float16"), name="w")
    sums = distclip.verify_replicas([v, w])
    assert len(sums) == 2
    w.values[1].assign(np.array([1, 1, 1.001], "float16"))
    with pytest.raises(distclip.ReplicaMismatchError, match=r"variable 'w:0' differs across replicas: checksums by replica \[\d+, \d+\]"):
        distclip.verify_replicas([v, w])
    assert distclip.verify_replicas([tf.Variable([1.0])]) == [int(checksum(tf.constant([1.0])))]
