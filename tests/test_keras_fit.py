"""model.fit with distclip.keras.ClipOptimizer, in this process: default strategy and MirroredStrategy."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from distclip import cli
from common import GLOBAL_BATCH, global_batch, make_model, max_abs_diff, reference_train
from distclip.train.logs import read_csv
from procs import free_ports, python, run_all

CLIP = 0.3
STEPS = 4


def data(steps=STEPS):
    xs, ys = zip(*(global_batch(s) for s in range(steps)))
    return np.concatenate(xs), np.concatenate(ys)


def fit(optimizer_fn, strategy=None, steps=STEPS, x=None, y=None, model=None, log_dir=None, batch_size=GLOBAL_BATCH):
    """`fit` over `steps` global batches of 16, in order; returns (model, optimizer, history)."""
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = model or make_model()
        optimizer = optimizer_fn()
        model.compile(optimizer=optimizer, loss="mse")
    if x is None:
        x, y = data(steps)
    callbacks = [distclip.keras.ClipLogger(log_dir)] if isinstance(optimizer, distclip.keras.ClipOptimizer) else []
    history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return model, optimizer, history.history


def clip_adam(clip_norm=CLIP, **kwargs):
    return lambda: distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), clip_norm, **kwargs)


def keras_adam(**kwargs):
    return lambda: keras.optimizers.Adam(0.05, **kwargs)


@pytest.fixture(scope="module")
def reference():
    """Single-device fit with Keras's global_clipnorm (correct on one device), and its norms."""
    model, _, _ = fit(keras_adam(global_clipnorm=CLIP))
    weights, norms = reference_train(CLIP, STEPS, "adam")
    assert max_abs_diff(model.get_weights(), weights) <= 1e-6, "the two single-device references agree"
    assert min(norms) > CLIP, "the threshold binds on every step"
    return weights, norms


@pytest.mark.parametrize("where", ["default", "mirrored"])
def test_fit_matches_single_device_global_clipnorm(reference, mirrored, where, tmp_path):
    strategy = mirrored if where == "mirrored" else None
    model, optimizer, history = fit(clip_adam(), strategy, log_dir=str(tmp_path))
    ref_weights, ref_norms = reference
    assert max_abs_diff(model.get_weights(), ref_weights) <= 1e-5
    # The metrics fit logs: epoch means of the synchronized norm and of the scale, and the skip count.
    assert history["global_norm"] == pytest.approx([np.mean(ref_norms)], rel=1e-5)
    assert history["clip_scale"] == pytest.approx([np.mean([CLIP / n for n in ref_norms])], rel=1e-5)
    assert history["skipped_steps"] == [0.0]
    assert int(optimizer.iterations.numpy()) == STEPS
    # ClipLogger's per-step CSV: the reference's norms, the threshold, the scale.
    rows = read_csv(os.path.join(tmp_path, "metrics.csv"))
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["global_norm"] for r in rows] == pytest.approx(ref_norms, rel=1e-5)
    assert [r["clip_norm"] for r in rows] == pytest.approx([CLIP] * STEPS)
    assert [r["scale"] for r in rows] == pytest.approx([CLIP / n for n in ref_norms], rel=1e-5)
    assert [r["clipped"] for r in rows] == [1.0] * STEPS and [r["skipped"] for r in rows] == [0.0] * STEPS
    assert os.listdir(os.path.join(tmp_path, "tensorboard"))
    # `distclip plot` draws it.
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert os.path.getsize(os.path.join(tmp_path, "plot.png")) > 10_000
    assert cli.main(["plot", str(tmp_path / "tensorboard")]) == 2  # no metrics.csv there


@pytest.mark.parametrize("clip_norm", [CLIP, distclip.SpikeClip(1.0, 0.9, 2)])
def test_fit_compiles_under_xla(reference, clip_norm):
    """`compile(jit_compile=True)`: the whole train step, ClipOptimizer included, as one XLA cluster."""
    x, y = data()
    with tf.distribute.get_strategy().scope():
        model = make_model()
        model.compile(optimizer=clip_adam(clip_norm, accumulation_steps=1)(), loss="mse", jit_compile=True)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    assert model.jit_compile
    if clip_norm == CLIP:
        assert max_abs_diff(model.get_weights(), reference[0]) <= 1e-5
    assert int(model.optimizer.iterations.numpy()) == STEPS


def test_keras_global_clipnorm_under_mirrored_does_not_match(reference, mirrored):
    model, _, _ = fit(keras_adam(global_clipnorm=CLIP), mirrored)
    assert max_abs_diff(model.get_weights(), reference[0]) > 1e-3


def _collective_elements(model):
    """Elements through CollectiveReduceV2 in everything `fit` traced (graph and nested functions)."""
    total = 0
    traced = [c.cell_contents for c in model.train_function.__closure__
              if hasattr(c.cell_contents, "_list_all_concrete_functions")]  # Keras's tf.function(s)
    assert traced
    for concrete in [f for t in traced for f in t._list_all_concrete_functions()]:
        graph_def = concrete.graph.as_graph_def()
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        for node in nodes:
            if node.op == "CollectiveReduceV2":
                total += 1
    return total


def test_fit_does_one_reduction(mirrored):
    plain, _, _ = fit(keras_adam(), mirrored, steps=1)
    ours, _, _ = fit(clip_adam(), mirrored, steps=1)
    # Plain Keras reduces each step's gradients once, packed: one collective per device.
    assert _collective_elements(plain) == mirrored.num_replicas_in_sync
    assert _collective_elements(ours) == _collective_elements(plain)


def test_nonfinite_step_is_skipped_by_fit(mirrored):
    x, y = data(2)
    x[GLOBAL_BATCH - 1, 0] = np.inf  # step 0, the second replica's half only
    with mirrored.scope():
        model = make_model()
    before = model.get_weights()
    model, optimizer, history = fit(clip_adam(), mirrored, x=x[:GLOBAL_BATCH], y=y[:GLOBAL_BATCH], model=model)
    assert max_abs_diff(model.get_weights(), before) == 0.0
    assert history["skipped_steps"] == [1.0]
    assert int(optimizer.iterations.numpy()) == 0
    slots = [v for v in optimizer.inner_optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert len(slots) == 2 * len(model.trainable_variables)
    assert all(np.all(v.numpy() == 0) for v in slots)  # Adam's moments untouched


@pytest.mark.parametrize("clip_norm", [CLIP, distclip.AutoClip(50.0, 8), distclip.SpikeClip(2.0, 0.9, 2),
                                       keras.optimizers.schedules.ExponentialDecay(1.0, 2, 0.5)])
def test_config_round_trip(clip_norm):
    optimizer = distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), clip_norm, nonfinite="raise")
    config = keras.saving.serialize_keras_object(optimizer)
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is distclip.keras.ClipOptimizer
    assert again.get_config() == optimizer.get_config()
    assert again.inner_optimizer.get_config() == optimizer.inner_optimizer.get_config()


def _resume(save_and_load, strategy, clip_norm):
    """Trains 2 steps, saves, loads, trains 2 more; returns (resumed weights, uninterrupted weights, opt, opt)."""
    x, y = data(4)
    whole, whole_opt, _ = fit(clip_adam(clip_norm), strategy, x=x, y=y)
    first, first_opt, _ = fit(clip_adam(clip_norm), strategy, x=x[:32], y=y[:32])
    resumed, resumed_opt = save_and_load(first, first_opt)
    resumed.fit(x[32:], y[32:], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return resumed, whole, resumed_opt, whole_opt


def test_keras_file_round_trip_resumes_exactly(tmp_path):
    def save_and_load(model, optimizer):
        path = os.path.join(tmp_path, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        return loaded, loaded.optimizer

    resumed, whole, resumed_opt, whole_opt = _resume(save_and_load, None, distclip.AutoClip(50.0, 8))
    assert type(resumed_opt) is distclip.keras.ClipOptimizer
    assert max_abs_diff(resumed.get_weights(), whole.get_weights()) == 0.0
    assert max_abs_diff([v.numpy() for v in resumed_opt.variables], [v.numpy() for v in whole_opt.variables]) == 0.0


def test_checkpoint_round_trip_resumes_exactly(tmp_path, mirrored):
    def save_and_load(model, optimizer):
        path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(os.path.join(tmp_path, "ckpt"))
        with mirrored.scope():
            fresh = make_model(seed=7)
            fresh_opt = clip_adam(distclip.SpikeClip(2.0, 0.9, 2))()
            fresh.compile(optimizer=fresh_opt, loss="mse")
            fresh_opt.build(fresh.trainable_variables)
        tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path).assert_existing_objects_matched()
        return fresh, fresh_opt

    resumed, whole, resumed_opt, whole_opt = _resume(save_and_load, mirrored, distclip.SpikeClip(2.0, 0.9, 2))
    assert int(resumed_opt.iterations.numpy()) == 4
    assert max_abs_diff(resumed.get_weights(), whole.get_weights()) == 0.0
    assert max_abs_diff([v.numpy() for v in resumed_opt.variables], [v.numpy() for v in whole_opt.variables]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["multiworker", "multiworker-mpirun", "horovod"])
def test_fit_across_processes_matches_single_device(reference, tmp_path, engine):
    _run_across_processes(reference, tmp_path, engine)


@pytest.mark.slow
def test_fit_under_multiworker_fails_as_upstream_without_the_keras_fix(tmp_path):
    """With the fix off, Keras's own failure comes back; the day Keras fixes #20585 this test fails, and
    `distclip.keras.multiworker_fit` can go."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "fit_train.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", DISTCLIP_KERAS_MWMS_FIX="0")
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    envs = [dict(env, TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
            for i in range(2)]
    results = run_all([[python(), worker, "multiworker", str(tmp_path), str(CLIP), str(STEPS)]] * 2, envs, timeout=240)
    assert any(r.returncode != 0 for r in results)
    assert any("Attempt to convert a value (PerReplica" in r.stdout for r in results), results[0].stdout[-3000:]


def _run_across_processes(reference, tmp_path, engine, accumulation=1):
    """2 processes equal single-device global_clipnorm fit: `fit` under horovodrun --gloo, and under
    MultiWorkerMirroredStrategy (where Keras 3.15's own `fit` fails, keras-team/keras#20585, unless
    `distclip.keras` patches it: see `distclip/keras/multiworker_fit.py`)."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "fit_train.py")
    launcher, engine = engine.partition("-")[2] or "launcher", engine.partition("-")[0]
    args = [worker, engine, str(tmp_path), str(CLIP), str(STEPS), str(accumulation)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if engine == "multiworker" and launcher == "mpirun":  # TF_CONFIG from the ranks, over mpi4py
        mpirun = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH"]
        results = run_all([[python(), "-m", "distclip.netns"] + mpirun + [python()] + args], [env], timeout=240)
    elif engine == "multiworker":  # the local launcher: TF_CONFIG for each worker
        results = run_all([[python(), "-m", "distclip.launcher", "--nproc", "2", "--", python()] + args], [env],
                          timeout=240)
    else:
        horovodrun = os.path.join(os.path.dirname(python()), "horovodrun")
        results = run_all([[horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", python()] + args], [env], timeout=240)
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
        # distclip.keras's fix for Keras's fit under MWMS says once that it acted (and only there).
        assert r.stdout.count("Keras's fit under MultiWorkerMirroredStrategy patched") == (2 if engine == "multiworker" else 0)
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    ref_weights, ref_norms = reference
    for r in ranks:
        assert max_abs_diff([np.array(w, "float32") for w in r["weights"]], ref_weights) <= 1e-5
        assert r["history"]["global_norm"] == pytest.approx([np.mean(ref_norms)], rel=1e-5)
        assert r["iterations"] == STEPS // accumulation
    assert ranks[0]["weights"] == ranks[1]["weights"]
    if engine == "multiworker":
        # evaluate and predict give the single-device numbers (every worker got the whole held-out batches).
        held_x, held_y = (np.concatenate(a) for a in zip(*(global_batch(100 + s) for s in range(2))))
        single = make_model()
        single.set_weights(ref_weights)
        single.compile(loss="mse")
        for r in ranks:
            assert r["evaluated"] == pytest.approx(single.evaluate(held_x, held_y, verbose=0), rel=1e-5)
            np.testing.assert_allclose(np.array(r["predicted"]), single.predict(held_x, verbose=0), atol=1e-5)
    clip_logs = [{k: v for k, v in r["history"].items() if k != "loss"} for r in ranks]  # loss: each rank's own
    assert clip_logs[0] == clip_logs[1]
    # Only rank 0 writes the log; its norms are the reference's.
    rows = read_csv(os.path.join(tmp_path, "log", "metrics.csv"))
    assert [r["global_norm"] for r in rows] == pytest.approx(ref_norms, rel=1e-5)
    assert len(os.listdir(os.path.join(tmp_path, "log", "tensorboard"))) == 1


@pytest.mark.parametrize("make, named", [
    (lambda: distclip.keras.ClipOptimizer("adam", 1.0), "optimizer"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), -1.0), "clip_norm"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), float("nan")), "clip_norm"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1, global_clipnorm=1.0), 1.0), "global_clipnorm"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0, nonfinite="ignore"), "nonfinite"),
    (lambda: distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0, backend="nccl"), "backend"),
])
def test_bad_arguments_name_the_argument(make, named):
    with pytest.raises(distclip.ArgumentError, match=named):
        make()


def test_clip_logger_needs_a_clip_optimizer():
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(1)
    with pytest.raises(distclip.ContextError, match="ClipOptimizer"):
        model.fit(x, y, batch_size=GLOBAL_BATCH, verbose=0, callbacks=[distclip.keras.ClipLogger()])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["multiworker", "horovod"])
def test_accumulation_across_processes_matches_a_larger_batch(tmp_path, engine):
    """accumulation_steps=2 with 2 processes: one update per 2 batches of 16 = single-device batch 32."""
    model, _, _ = fit(keras_adam(global_clipnorm=CLIP), x=data()[0], y=data()[1], batch_size=2 * GLOBAL_BATCH)
    _, ref_norms = reference_train(CLIP, STEPS // 2, "adam", batches=[
        tuple(np.concatenate(a) for a in zip(global_batch(2 * s), global_batch(2 * s + 1))) for s in range(STEPS // 2)])
    _run_across_processes((model.get_weights(), ref_norms), tmp_path, engine, accumulation=2)


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
