"""Mixed precision: ClipOptimizer(LossScaleOptimizer(...)) decides overflows on the synchronized gradients."""
import json
import os
import shutil

import numpy as np
import pytest

from common import global_batch, max_abs_diff, reference_train
from procs import ROOT, WORKERS, python, run_all


CLIP = 0.3


def test_overflow_on_one_horovod_rank_skips_on_both(tmp_path):
    """horovodrun -np 2, mixed_float16, rank 1's first batch overflows: both ranks skip it and halve the scale."""
    import json
    import os

    from procs import python, run_all

    worker = os.path.join(WORKERS, "fit_train.py")
    horovodrun = os.path.join(os.path.dirname(python()), "horovodrun")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    (r,) = run_all([[horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", python(), worker, "horovod",
                     str(tmp_path), str(CLIP), "3", "1", "fp16"]], [env], timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for rank in ranks:
        assert rank["history"]["skipped_steps"] == [1.0]
        assert rank["iterations"] == 2
        assert rank["loss_scale"] == 2.0 ** 14
        assert all(np.all(np.isfinite(np.array(w))) for w in rank["weights"])
    assert ranks[0]["weights"] == ranks[1]["weights"]



WORKER = os.path.join(WORKERS, "horovod_train.py")
BIN = os.path.dirname(python())
ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

LAUNCHERS = {
    "horovodrun-gloo": [os.path.join(BIN, "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"],
    "horovodrun-mpi": [os.path.join(BIN, "horovodrun"), "--mpi", "-np", "2", "-H", "localhost:2"],
    "mpirun": ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"],
}


def _launch(launcher, out_dir, *args):
    if shutil.which(LAUNCHERS[launcher][0]) is None:
        pytest.fail(f"{LAUNCHERS[launcher][0]} is not installed: run scripts/setup.sh")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **ROOT_OK)
    cmd = LAUNCHERS[launcher] + [python(), WORKER, str(out_dir)] + [str(a) for a in args]
    (result,) = run_all([cmd], [env], timeout=240)
    assert result.returncode == 0, f"{launcher} exited {result.returncode}:\n{result.stdout[-4000:]}"
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2]
    return ranks


@pytest.mark.parametrize("launcher", ["horovodrun-mpi", "mpirun"])  # horovodrun --gloo: test_eight_replicas.py
def test_ranks_match_single_process_reference(tmp_path, launcher):
    """Equal to single-process training on the global batch; at step 1 rank 1's shard holds an inf, and both ranks
    skip that step together, as if the batch had never been seen."""
    steps, clip_norm, poison = 4, 0.2, 1
    ranks = _launch(launcher, tmp_path, clip_norm, steps, poison)
    kept = [global_batch(s) for s in range(steps) if s != poison]
    ref_weights, ref_norms = reference_train(clip_norm, steps - 1, batches=kept)
    for r in ranks:
        assert max_abs_diff([np.array(w, "float32") for w in r["weights"]], ref_weights) <= 1e-5
        assert not np.isfinite(r["norms"][poison])
        assert [n for s, n in enumerate(r["norms"]) if s != poison] == pytest.approx(ref_norms, rel=1e-5)
        assert r["skipped"] == 1 and r["iterations"] == steps - 1
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert np.array_equal(ranks[0]["norms"], ranks[1]["norms"], equal_nan=True)
    assert all(n > clip_norm for n in ref_norms)
    # The cluster helpers see the launch: from Horovod itself, and from the launcher's environment alone.
    env_launcher = {"horovodrun-mpi": "mpirun", "mpirun": "mpirun"}[launcher]
    for r in ranks:
        assert r["verified"] == "ok"
        assert r["cluster"] == {"rank": r["rank"], "size": 2, "local_rank": r["rank"], "local_size": 2, "launcher": "horovod"}
        assert r["env_cluster"] == dict(r["cluster"], launcher=env_launcher)


def test_verify_replicas_catches_a_perturbed_rank(tmp_path):
    ranks = _launch("mpirun", tmp_path, 0.2, 2, -1, 1)
    for r in ranks:
        assert r["verified"].startswith("variable 'sequential/dense/kernel' differs across replicas: checksums by replica [")


@pytest.mark.parametrize("fit", [False, True], ids=["loop", "fit"])
def test_distclip_train_under_horovodrun_matches_mirrored(tmp_path, fit):
    """`distclip train [--fit] --strategy horovod`: same summary on both ranks, same numbers as under MirroredStrategy."""
    import csv

    train = [os.path.join(BIN, "distclip"), "train", "--steps", "12", "--clip-norm", "0.5", "--seed", "5",
             "--nan-at", "4", "--variable-norms-every", "4", "--noise-scale"]
    train += ["--fit"] if fit else []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **ROOT_OK)
    hvd_cmd = LAUNCHERS["horovodrun-gloo"] + train + ["--strategy", "horovod", "--out", str(tmp_path / "hvd")]
    mirrored_cmd = train + ["--strategy", "mirrored", "--out", str(tmp_path / "mirrored")]
    for cmd in (hvd_cmd, mirrored_cmd):
        (r,) = run_all([cmd], [env], timeout=240)
        assert r.returncode == 0, r.stdout[-4000:]
        if cmd is hvd_cmd:
            per_rank = {}
            for line in r.stdout.splitlines():
                if line.startswith("[") and "]<stdout>:" in line:
                    rank, text = line[1:].split("]<stdout>:", 1)
                    per_rank.setdefault(rank, []).append(text)
            summaries = {k: [t for t in v if t.startswith(("distclip train:", "  final", "  held-out", "  steps", "  replicas"))]
                         for k, v in per_rank.items()}
            assert set(summaries) == {"0", "1"} and summaries["0"] == summaries["1"] and len(summaries["0"]) == 5
            assert "Horovod x2" in summaries["0"][0]
            # Rank 0 names rank 1 (its own process, on its CPU) as the source of step 4's NaN.
            assert "step 4 skipped: non-finite gradients from replica 1 (worker 1, host " in r.stdout

    def rows(name):
        with open(tmp_path / name / "metrics.csv") as f:
            return list(csv.DictReader(f))

    assert len(rows("hvd")) == len(rows("mirrored")) == 12
    for h, m in zip(rows("hvd"), rows("mirrored")):
        # (Under --fit the CSV's loss is fit's running mean of this rank's own loss.)
        for col in ("global_norm", "scale") if fit else ("loss", "global_norm", "scale"):
            assert float(h[col]) == pytest.approx(float(m[col]), rel=1e-4, nan_ok=True), (h["step"], col)
    # The same step, replica and variables named; per-layer norms and the noise scale as under MirroredStrategy.
    summary = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("hvd", "mirrored")}
    named = {name: [(s["step"], [p["replica"] for p in s["replicas"]], s["variables"])
                    for s in summary[name]["nonfinite_steps"]] for name in summary}
    assert named["hvd"] == named["mirrored"] and [n[:2] for n in named["hvd"]] == [(4, [1])]
    assert len(named["hvd"][0][2]) == 5  # the NaN input reaches every variable
    assert summary["hvd"]["b_simple"] == pytest.approx(summary["mirrored"]["b_simple"], rel=1e-3)

    def layers(name):
        with open(tmp_path / name / "layer_norms.csv") as f:
            return [(r["step"], r["layer"], float(r["norm"])) for r in csv.DictReader(f)]

    assert [row[:2] for row in layers("hvd")] == [row[:2] for row in layers("mirrored")]
    assert sorted({int(row[0]) for row in layers("hvd")}) == [0, 4, 8]
    for h, m in zip(layers("hvd"), layers("mirrored")):
        assert h[2] == pytest.approx(m[2], rel=1e-4, nan_ok=True)


def test_indexed_slices_and_compression_under_horovod(tmp_path):
    """All-gathered by default, densified on request, fp16 on the wire, in buckets: the norm is the dense one every
    time."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **ROOT_OK)
    cmd = LAUNCHERS["horovodrun-gloo"] + [python(), os.path.join(WORKERS, "horovod_sparse.py"), str(tmp_path)]
    (r,) = run_all([cmd], [env], timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    # The dense gradients each rank stands for, averaged (Horovod's reduction).
    emb = np.zeros((2, 6, 2))
    for rank, idx in ((0, [0, 2, 2]), (1, [2, 5, 5])):
        vals = np.array([[1.0 + rank, 2.0], [3.0, -1.0 - rank], [0.5, 0.5]])
        for row, i in zip(vals, idx):
            emb[rank, i] += row
    emb = emb.mean(axis=0)
    dense = np.mean([[1.0, -2.0, 0.5], [1.0, -4.0, 0.5]], axis=0)
    want = np.sqrt((emb ** 2).sum() + (dense ** 2).sum())
    for got in ranks:
        for mode, tol in (("sparse", 1e-6), ("dense", 1e-6), ("fp16", 1e-3), ("buckets", 1e-6)):
            assert got[mode]["norm"] == pytest.approx(want, rel=tol), mode
            np.testing.assert_allclose(got[mode]["emb"], emb / want, rtol=tol, atol=tol)
            np.testing.assert_allclose(got[mode]["dense"], dense / want, rtol=tol, atol=tol)
        assert got["sparse"]["sparse"] and not got["dense"]["sparse"] and got["fp16"]["sparse"] and got["buckets"]["sparse"]
    assert ranks[0] == ranks[1]


def test_accumulation_checkpoints_refused_between_updates_and_exact_at_one(tmp_path):
    worker = os.path.join(WORKERS, "horovod_accumulation_resume.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    (r,) = run_all([LAUNCHERS["horovodrun-gloo"] + [python(), worker, str(tmp_path)]], [env], timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert "between updates: 1 of accumulation_steps=2 micro-batches" in ranks[0]["refused"]
    assert [r["bit_identical"] for r in ranks] == [True, True]
    assert [r["iterations"] for r in ranks] == [3, 3]