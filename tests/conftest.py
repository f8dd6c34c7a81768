"""Test set-up: split the CPU into 2 logical devices before TensorFlow initialises.

Every test in a process shares one TensorFlow runtime (it is slow to start);
tests that need their own processes (MultiWorkerMirroredStrategy, the CLI) spawn them.
"""
import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

pytest_plugins = ["timing"]  # --file-times (tests/timing.py)


def pytest_configure(config):
    """Two logical CPU devices, in every process that collects the tests: pytest-xdist's workers, or pytest itself
    without workers. Not in pytest-xdist's controller, which collects nothing: TensorFlow's import there (3 s)
    would only delay the workers' start."""
    controller = (getattr(config, "workerinput", None) is None and config.getoption("dist", "no") != "no"
                  and not config.getoption("collectonly"))
    if controller:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


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
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def no_merge_call(mirrored, monkeypatch):
    """MirroredStrategy over the 2 logical CPUs in the regime GPUs run when the step is compiled with XLA: the
    strategy needs no merge_call (`_use_merge_call()` is False; TensorFlow decides it from XLA and all-GPU
    devices). XLA cannot compile a MirroredStrategy step over logical CPU devices ("Trying to access resource
    ... located in device CPU:1 from device CPU:0"), so the regime is forced without it. (The session's strategy,
    for the time of the test: a second strategy over the same devices would reuse its collective keys.)"""
    monkeypatch.setattr(mirrored.extended, "_use_merge_call", lambda: False)
    return mirrored


@pytest.fixture(scope="session")
def reference():
    """Single-device fit with Keras's global_clipnorm on the tiny model: (weights, norms) (see fitting.py)."""
    import fitting

    return fitting.reference()
