"""Module paths from before the cluster tooling and the example application got folders of their own.

`import distclip.launcher`, `from distclip.verify import verify_replicas` and
`python -m distclip.watchdog` keep working (scripts and sbatch files copied
from earlier releases call them): each old name is the new module itself, not
a copy, so `distclip.launcher is distclip.cluster.launcher`.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "distclip.launcher": "distclip.cluster.launcher",
    "distclip.watchdog": "distclip.cluster.watchdog",
    "distclip.netns": "distclip.cluster.netns",
    "distclip.strategies": "distclip.cluster.strategies",
    "distclip.verify": "distclip.cluster.verify",
    "distclip.cli": "distclip.train.cli",
}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        real = importlib.util.find_spec(MOVED[name])
        return importlib.util.spec_from_loader(name, self, origin=real.origin)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system is about to set __spec__ to the old name's
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state  # give it back its own

    def get_code(self, name):
        """For `python -m OLD`: runpy runs the new module's code as __main__."""
        real = importlib.util.find_spec(MOVED[name])
        return real.loader.get_code(real.name)


def install() -> None:
    if not any(isinstance(f, _OldPath) for f in sys.meta_path):
        sys.meta_path.append(_OldPath())
