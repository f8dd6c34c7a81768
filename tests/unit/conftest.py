"""The unit tier: one process, no Horovod, no MPI (the scenario tests need those; scripts/setup.sh installs them)."""
import importlib.abc
import sys

import pytest


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("horovod", "mpi4py"):
            raise ImportError(f"a unit test imported {name}: the unit tier must run without Horovod and MPI "
                              "(a test that needs them is a scenario, under tests/scenarios/)")
        return None


@pytest.fixture(autouse=True)
def without_horovod_and_mpi():
    if any(m.split(".")[0] in ("horovod", "mpi4py") for m in sys.modules):
        yield  # imported by a scenario test earlier in this process: nothing to check
        return
    finder = _Refuse()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
