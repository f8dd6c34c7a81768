"""distclip.keras.multiworker_fit: the fix for Keras's fit under MultiWorkerMirroredStrategy, installed once and
only where Keras's own code needs it (the fit itself runs in tests/scenarios/test_fit_across_processes.py)."""


from common import make_model


def test_the_keras_multiworker_fix_is_installed_once_and_only_where_needed(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    from distclip.keras import multiworker_fit

    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica
    assert getattr(build, "_distclip_mwms_fix") and getattr(reduce, "_distclip_mwms_fix")  # by `import distclip.keras`
    assert multiworker_fit.install()
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is build and trainer.reduce_per_replica is reduce
    # Decided by the installed Keras's code: the wrapped originals hold the failing calls; other code does not.
    assert multiworker_fit._needs(build.__wrapped__, "self.distribute_strategy.reduce(")
    assert multiworker_fit._needs(reduce.__wrapped__, 'strategy.reduce("MEAN",v,axis=0)')
    assert not multiworker_fit._needs(make_model, 'strategy.reduce("MEAN",v,axis=0)')
    monkeypatch.setenv("DISTCLIP_KERAS_MWMS_FIX", "0")
    assert not multiworker_fit.install()
