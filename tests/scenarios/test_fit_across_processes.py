"""model.fit with ClipOptimizer across 2 processes (MultiWorkerMirroredStrategy under the local launcher and
mpirun, Horovod under horovodrun) equals single-device global_clipnorm fit."""
import json
import os

import numpy as np
import pytest

from common import GLOBAL_BATCH, global_batch, make_model, max_abs_diff, reference_train
from distclip.train.plots import read_csv
from procs import WORKERS, free_ports, python, run_all
from fitting import CLIP, STEPS, data, fit, keras_adam


@pytest.mark.parametrize("backend", ["multiworker", "multiworker-mpirun", "horovod"])
def test_fit_across_processes_matches_single_device(reference, tmp_path, backend):
    _run_across_processes(reference, tmp_path, backend)


def test_fit_under_multiworker_fails_as_upstream_without_the_keras_fix(tmp_path):
    """With the fix off, Keras's own failure comes back; the day Keras fixes #20585 this test fails, and
    `distclip._src.keras.multiworker_fit` can go."""
    worker = os.path.join(WORKERS, "fit_train.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", DISTCLIP_KERAS_MWMS_FIX="0")
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    envs = [dict(env, TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
            for i in range(2)]
    results = run_all([[python(), worker, "multiworker", str(tmp_path), str(CLIP), str(STEPS)]] * 2, envs, timeout=240)
    assert any(r.returncode != 0 for r in results)
    assert any("Attempt to convert a value (PerReplica" in r.stdout for r in results), results[0].stdout[-3000:]


def _run_across_processes(reference, tmp_path, backend, accumulation=1):
    """2 processes equal single-device global_clipnorm fit: `fit` under horovodrun --gloo, and under
    MultiWorkerMirroredStrategy (where Keras 3.15's own `fit` fails, keras-team/keras#20585, unless
    fixed: see `distclip/_src/keras/multiworker_fit.py`)."""
    worker = os.path.join(WORKERS, "fit_train.py")
    launcher, backend = backend.partition("-")[2] or "launcher", backend.partition("-")[0]
    args = [worker, backend, str(tmp_path), str(CLIP), str(STEPS), str(accumulation)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if backend == "multiworker" and launcher == "mpirun":  # TF_CONFIG from the ranks, over mpi4py
        mpirun = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH"]
        results = run_all([[python(), "-m", "distclip.cluster.netns"] + mpirun + [python()] + args], [env], timeout=240)
    elif backend == "multiworker":  # the local launcher: TF_CONFIG for each worker
        results = run_all([[python(), "-m", "distclip.cluster.launcher", "--nproc", "2", "--", python()] + args], [env],
                          timeout=240)
    else:
        horovodrun = os.path.join(os.path.dirname(python()), "horovodrun")
        results = run_all([[horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", python()] + args], [env], timeout=240)
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    # Keras's fit under MWMS is fixed by ClipOptimizer created under the strategy, not by the import (and only there).
    assert [r["keras_fix"] for r in ranks] == [[False, backend == "multiworker"]] * 2
    ref_weights, ref_norms = reference
    for r in ranks:
        assert max_abs_diff([np.array(w, "float32") for w in r["weights"]], ref_weights) <= 1e-5
        assert r["history"]["global_norm"] == pytest.approx([np.mean(ref_norms)], rel=1e-5)
        assert r["iterations"] == STEPS // accumulation
    assert ranks[0]["weights"] == ranks[1]["weights"]
    if backend == "multiworker":
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


@pytest.mark.parametrize("backend", ["multiworker", "horovod"])
def test_accumulation_across_processes_matches_a_larger_batch(tmp_path, backend):
    """accumulation_steps=2 with 2 processes: one update per 2 batches of 16 = single-device batch 32."""
    model, _, _ = fit(keras_adam(global_clipnorm=CLIP), x=data()[0], y=data()[1], batch_size=2 * GLOBAL_BATCH)
    _, ref_norms = reference_train(CLIP, STEPS // 2, "adam", batches=[
        tuple(np.concatenate(a) for a in zip(global_batch(2 * s), global_batch(2 * s + 1))) for s in range(STEPS // 2)])
    _run_across_processes((model.get_weights(), ref_norms), tmp_path, backend, accumulation=2)
