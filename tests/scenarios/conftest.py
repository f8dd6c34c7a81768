"""Scenario tests start processes (MultiWorkerMirroredStrategy, horovodrun, mpirun, Slurm, the CLI): all are `slow`."""
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/scenarios/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
