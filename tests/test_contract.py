"""Keras as the oracle: every optimizer `keras.optimizers` exports, through ClipStep and ClipOptimizer
(built beforehand and built lazily), equals its own `apply` on one device after `tf.clip_by_global_norm`.

No strategy and MirroredStrategy run here; 2-process MultiWorkerMirroredStrategy and
`horovodrun -np 2` run the same cases in workers/contract_worker.py. See tests/contract.py.
"""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import contract
import distclip
from procs import free_ports, python, run_all

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "contract_worker.py")
ENGINES = ("none", "mirrored")


def _engine(name, mirrored):
    return {} if name == "none" else dict(strategy=mirrored, replicas=2)


def test_every_exported_optimizer_is_a_case():
    names = contract.exported()
    # Found at run time: a class a later Keras exports joins the cases without an edit here.
    assert {"Adam", "Nadam", "Muon", "MultiOptimizer", "LossScaleOptimizer", "ScheduleFreeAdamW"} <= set(names)
    assert "Optimizer" not in names
    for name in names:
        assert isinstance(contract.factory(name)(), keras.optimizers.Optimizer), name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name,api,lazy", contract.all_cases(),
                         ids=[f"{n}-{a}-{'lazy' if b else 'built'}" for n, a, b in contract.all_cases()])
def test_equals_the_optimizers_own_apply(mirrored, engine, name, api, lazy):
    found, _ = contract.check_case(name, api, lazy, **_engine(engine, mirrored))
    assert not found, found


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", contract.SKIP_CASES)
@pytest.mark.parametrize("api", contract.APIS)
def test_nonfinite_step_is_skipped_on_every_replica(mirrored, engine, name, api):
    found, _ = contract.check_skip(name, api, True, **_engine(engine, mirrored))
    assert not found, found


def _check_workers(outs):
    ranks = [json.loads(o.read_text()) for o in outs]
    expected = len(contract.all_cases()) + len(contract.SKIP_CASES) * len(contract.APIS) * 2
    assert len(ranks[0]) == expected
    failed = {k: v["mismatches"] for k, v in ranks[0].items() if v["mismatches"]}
    assert not failed, failed
    # Both processes end with the same values, bit for bit.
    assert {k: v["digest"] for k, v in ranks[0].items()} == {k: v["digest"] for k, v in ranks[1].items()}


@pytest.mark.slow
def test_under_two_process_multiworker_mirrored_strategy(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    commands, envs = [], []
    for i in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        envs.append(dict(os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="2"))
        commands.append([python(), WORKER, "multiworker", str(tmp_path / "w{rank}.json")])
    for i, r in enumerate(run_all(commands, envs, timeout=400)):
        assert r.returncode == 0, f"worker {i} exited {r.returncode}:\n{r.stdout[-3000:]}"
    _check_workers([tmp_path / "w0.json", tmp_path / "w1.json"])


@pytest.mark.slow
def test_under_horovodrun(tmp_path):
    cmd = [os.path.join(os.path.dirname(python()), "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
           python(), WORKER, "horovod", str(tmp_path / "h{rank}.json")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    (r,) = run_all([cmd], [env], timeout=400)
    assert r.returncode == 0, f"horovodrun exited {r.returncode}:\n{r.stdout[-3000:]}"
    _check_workers([tmp_path / "h0.json", tmp_path / "h1.json"])


# Features of `optimizer.apply` that come with the optimizer's own code.
FEATURES = {
    "ema": lambda: keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9),
    "ema_overwrite": lambda: keras.optimizers.Nadam(0.05, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
}


@pytest.fixture
def features(monkeypatch):
    for key, make in FEATURES.items():
        monkeypatch.setitem(contract.FACTORIES, key, make)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", contract.APIS)
def test_ema_and_variable_constraints_work(mirrored, features, engine, api):
    found, _ = contract.check_case("ema", api, True, constrained=True, **_engine(engine, mirrored))
    assert not found, found
    # The constraint bound: some kernel entries sit at exactly 0 (NonNeg), and the EMA moved.
    variables, optimizer, _, _, _ = contract.run_distclip("ema", api, True, constrained=True,
                                                          **_engine(engine, mirrored))
    assert any((v.numpy() == 0).any() for v in variables if "kernel" in v.name)
    assert any(not np.array_equal(a.numpy(), v.numpy())
               for a, v in zip(optimizer._model_variables_moving_average, variables))


def test_ema_overwrite_works_without_a_strategy_and_is_refused_where_keras_fails(mirrored, features):
    found, _ = contract.check_case("ema_overwrite", "ClipStep", True)
    assert not found, found
    # Under MirroredStrategy Keras's own apply fails with ema_overwrite_frequency (a cond around a
    # merge_call in the replica context): refused up front, naming the class and the feature.
    with mirrored.scope():
        for make in (distclip.ClipStep, distclip.keras.ClipOptimizer):
            with pytest.raises(distclip.ArgumentError, match="Nadam has ema_overwrite_frequency=2 under MirroredStrategy"):
                make(FEATURES["ema_overwrite"](), 1.0)


@pytest.mark.parametrize("make", [distclip.ClipStep, distclip.keras.ClipOptimizer], ids=contract.APIS)
@pytest.mark.parametrize("optimizer,match", [
    (lambda: keras.optimizers.Adam(gradient_accumulation_steps=2),
     "Adam has gradient_accumulation_steps=2.*accumulation_steps"),
    (lambda: keras.optimizers.SGD(loss_scale_factor=8.0), "SGD has loss_scale_factor=8.0.*LossScaleOptimizer"),
    (lambda: keras.optimizers.RMSprop(clipnorm=1.0), "RMSprop has clipnorm=1.0"),
    (lambda: keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(keras.optimizers.SGD(),
                                                                           {"a": keras.optimizers.Adam(clipvalue=1.0)})),
     "Adam has clipvalue=1.0"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Lion(global_clipnorm=2.0)),
     "Lion has global_clipnorm=2.0"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(), 1.0), "ClipOptimizer already clips"),
], ids=["gradient_accumulation_steps", "loss_scale_factor", "clipnorm", "inside MultiOptimizer",
        "inside LossScaleOptimizer", "ClipOptimizer"])
def test_unsupported_features_are_refused_at_construction(make, optimizer, match):
    with pytest.raises(distclip.ArgumentError, match=match):
        make(optimizer(), 1.0)


@pytest.mark.parametrize("api", contract.APIS)
def test_overwrite_with_gradient_variables_are_refused_before_anything_is_written(api):
    variables, optimizer = contract.make_variables(), keras.optimizers.Adam(0.1)
    variables[1].overwrite_with_gradient = True  # what float8 layers set on their scale and amax history
    wrapper = distclip.ClipStep(optimizer, 1.0) if api == "ClipStep" else distclip.keras.ClipOptimizer(optimizer, 1.0)
    before = contract.values(variables)
    grads = [tf.ones_like(v.value) for v in variables]
    for run in (lambda: wrapper.apply(grads, variables), tf.function(lambda: wrapper.apply(grads, variables))):
        with pytest.raises(distclip.ArgumentError, match="dense_kernel has overwrite_with_gradient=True"):
            run()
    assert all(np.array_equal(a, b) for a, b in zip(before, contract.values(variables)))
    assert not optimizer.built
