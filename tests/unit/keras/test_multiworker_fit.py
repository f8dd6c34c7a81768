"""distclip._src.keras.multiworker_fit: the fix for Keras's fit under MultiWorkerMirroredStrategy installs once, on
the Keras releases known to fail, when asked (the fit itself, and ClipOptimizer installing it under a multi-worker
strategy, run in tests/scenarios/test_fit_across_processes.py; that importing distclip installs nothing:
tests/unit/keras/test_optimizer.py, in a fresh process)."""
import keras
import pytest
from keras.src.backend.tensorflow import trainer

import distclip
from distclip._src.keras import multiworker_fit


@pytest.fixture
def keras_trainer(monkeypatch):
    """Keras's trainer, put back as it was after the test."""
    monkeypatch.setattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build", trainer.TensorFlowTrainer._maybe_symbolic_build)
    monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)
    monkeypatch.delenv(multiworker_fit.ENV, raising=False)
    return trainer


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
