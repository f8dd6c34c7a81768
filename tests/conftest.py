"""Test set-up: split the CPU into 2 logical devices before TensorFlow initialises.

Every test in this process shares one TensorFlow runtime (it is slow to start);
tests that need their own processes (MultiWorkerMirroredStrategy, the CLI) spawn them.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite fails if any test leaves a child process (a worker, a CLI run) running."""
    import psutil

    yield
    children = psutil.Process().children(recursive=True)
    assert not children, f"processes left running: {[(p.pid, p.name()) for p in children]}"


@pytest.fixture(scope="session", autouse=True)
def temporary_files_in_the_test_folder(tmp_path_factory):
    """The processes the tests start keep their temporary files (AutoGraph's sources, Open MPI's session
    folders, ...) under this session's pytest folder, so a killed worker's leftovers stay there, not in /tmp."""
    folder = tmp_path_factory.mktemp("tmp")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    yield
    if old is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = old


@pytest.fixture(scope="session")
def mirrored():
    """MirroredStrategy over the 2 logical CPU devices."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def reference():
    """Single-device fit with Keras's global_clipnorm on the tiny model: (weights, norms) (see fitting.py)."""
    import fitting

    return fitting.reference()
