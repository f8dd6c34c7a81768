"""8 replicas on every backend that can run them here: MirroredStrategy over 8 logical CPUs, MultiWorkerMirroredStrategy
with 4 processes x 2 logical CPUs, and horovodrun -np 8. Each equals single-device training on the global batch with
tf.clip_by_global_norm (a threshold that binds on every step), skips a step whose norm is inf on every replica
together, and ends with every replica bit-identical."""
import json
import os

import numpy as np
import pytest

from common import global_batch, max_abs_diff, reference_train
from procs import WORKERS, free_ports, python, require, run_all

CLIP, STEPS, POISON = 0.2, 4, 1
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def _launch(backend, tmp_path):
    """Runs the 8 replicas; returns every process's JSON report."""
    if backend == "horovodrun":
        horovodrun = os.path.join(os.path.dirname(python()), "horovodrun")
        require(horovodrun)
        cmd = [horovodrun, "--gloo", "-np", "8", "-H", "localhost:8", python(), os.path.join(WORKERS, "horovod_train.py"),
               str(tmp_path), str(CLIP), str(STEPS), str(POISON)]
        (r,) = run_all([cmd], [ENV], timeout=300)
        assert r.returncode == 0, r.stdout[-4000:]
        return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(8)]
    worker = [python(), os.path.join(WORKERS, "eight_replicas.py"), backend, str(tmp_path / "w{rank}.json"), str(CLIP),
              str(STEPS), str(POISON)]
    if backend == "mirrored":
        (r,) = run_all([worker], [ENV], timeout=300)
        assert r.returncode == 0, r.stdout[-4000:]
        return [json.loads((tmp_path / "w0.json").read_text())]
    workers = [f"127.0.0.1:{p}" for p in free_ports(4)]
    envs = [dict(ENV, TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
            for i in range(4)]
    results = run_all([worker] * 4, envs, timeout=300)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"worker {i} exited {r.returncode}:\n{r.stdout[-3000:]}"
    return [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(4)]


@pytest.mark.parametrize("backend", ["mirrored", "multiworker", "horovodrun"])
def test_eight_replicas_match_single_device_and_skip_together(tmp_path, backend):
    reports = _launch(backend, tmp_path)
    kept = [global_batch(s) for s in range(STEPS) if s != POISON]
    ref_weights, ref_norms = reference_train(CLIP, len(kept), "adam", batches=kept)
    assert min(ref_norms) > CLIP, "the threshold binds on every step"
    for rep in reports:
        assert max_abs_diff([np.array(w, "float32") for w in rep["weights"]], ref_weights) <= 1e-5
        norms = [n if backend == "horovodrun" else n[0] for n in rep["norms"]]
        assert not np.isfinite(float(norms[POISON]))
        assert [float(n) for i, n in enumerate(norms) if i != POISON] == pytest.approx(ref_norms, rel=1e-5)
        assert rep["iterations"] == STEPS - 1
        if backend == "horovodrun":
            assert rep["skipped"] == 1 and rep["size"] == 8 and rep["verified"] == "ok"
            # The cluster helpers see the launch: from Horovod itself, and from horovodrun's environment alone.
            mine = {"rank": rep["rank"], "size": 8, "local_rank": rep["rank"], "local_size": 8}
            assert rep["cluster"] == dict(mine, launcher="horovod")
            assert rep["env_cluster"] == dict(mine, launcher="horovodrun")
        else:
            assert set(rep["skipped"]) == {1} and rep["local_replicas_identical"]
            assert rep["local_replicas"] * len(reports) == 8
            # Each local replica does its own norm pass (and rescaled pass) per gradient, once, and one pass over
            # its own gradients for its report (non-finite flag, sum of squares).
            assert rep["squared_norms"] == [3 * 4 * rep["local_replicas"]], rep["squared_norms"]
    # Every process ends with the same bits, and verify_replicas agreed.
    assert all(r["weights"] == reports[0]["weights"] for r in reports)
    if backend != "horovodrun":
        assert all(r["checksums"] == reports[0]["checksums"] for r in reports)
