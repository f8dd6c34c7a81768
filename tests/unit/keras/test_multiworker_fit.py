"""distclip._src.keras.multiworker_fit: importing distclip changes nothing in Keras; the fix for Keras's fit under
MultiWorkerMirroredStrategy installs once, on the Keras releases known to fail, when asked (the fit itself, and
ClipOptimizer installing it under a multi-worker strategy, run in tests/scenarios/test_fit_across_processes.py)."""
import os
import subprocess
import sys

import keras
import pytest
from keras.src.backend.tensorflow import trainer

import distclip
from distclip._src.keras import multiworker_fit

IMPORT_CHECK = """
import io, sys
import keras
from keras.src.backend.tensorflow import trainer
before = (trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica, list(sys.meta_path),
          sorted(keras.saving.get_custom_objects()))
sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
import distclip, distclip.cluster
printed = sys.stdout.getvalue() + sys.stderr.getvalue()
after_distclip = sorted(keras.saving.get_custom_objects())
import distclip.keras
printed += sys.stdout.getvalue() + sys.stderr.getvalue()
sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
after = (trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica, list(sys.meta_path))
print(before[:3] == after, before[3] == after_distclip, repr(printed))
"""


@pytest.fixture
def keras_trainer(monkeypatch):
    """Keras's trainer, put back as it was after the test."""
    monkeypatch.setattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build", trainer.TensorFlowTrainer._maybe_symbolic_build)
    monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)
    monkeypatch.delenv(multiworker_fit.ENV, raising=False)
    return trainer


def test_importing_distclip_changes_nothing_in_keras_and_prints_nothing():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], env=env, capture_output=True, text=True, timeout=120)
    # Keras's trainer and the import system untouched, nothing printed; registering ClipOptimizer for saved
    # models is `import distclip.keras`'s one effect, and `import distclip` has none.
    assert out.stdout.split() == ["True", "True", "''"], out.stdout + out.stderr[-2000:]


def test_the_fix_installs_once_when_asked(keras_trainer):
    assert not multiworker_fit.installed()
    assert distclip.keras.fix_multiworker_fit()
    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica
    assert multiworker_fit.installed() and build.__wrapped__ and reduce.__wrapped__
    assert distclip.keras.fix_multiworker_fit()
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is build and trainer.reduce_per_replica is reduce


def test_the_fix_is_for_the_keras_releases_known_to_fail(keras_trainer, monkeypatch):
    assert multiworker_fit._keras_fails(), f"keras {keras.version()} is one of the failing releases"
    monkeypatch.setattr(keras, "version", lambda: "3.16.0")
    assert not distclip.keras.fix_multiworker_fit() and not multiworker_fit.installed()
    monkeypatch.setenv(multiworker_fit.ENV, "1")  # a newer release that still fails: installed when asked
    assert distclip.keras.fix_multiworker_fit() and multiworker_fit.installed()


def test_the_fix_can_be_turned_off(keras_trainer, monkeypatch):
    monkeypatch.setenv(multiworker_fit.ENV, "0")
    assert not distclip.keras.fix_multiworker_fit() and not multiworker_fit.installed()


def test_clip_optimizer_outside_multi_worker_leaves_keras_alone(keras_trainer, mirrored):
    with mirrored.scope():
        distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0)
    distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0)
    assert not multiworker_fit.installed()
