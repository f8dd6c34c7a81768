"""`distclip train` end to end, in its own process: outputs, summary, and bad flags."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from procs import TESTS


BIN = os.path.join(os.path.dirname(sys.executable), "distclip")


def _run(args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _scalars(event_dir):
    tags = {}
    for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append(event.step)
    return tags


def test_train_writes_csv_tensorboard_plot_and_summary(tmp_path):
    out = tmp_path / "run"
    r = _run([BIN, "train", "--steps", "40", "--clip-norm", "0.5", "--seed", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "MirroredStrategy x2" in r.stdout and "steps clipped:" in r.stdout and "steps skipped" in r.stdout

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(40))
    assert set(rows[0]) == {"step", "loss", "global_norm", "scale", "clip_norm", "clipped", "skipped", "action"}
    assert {r["action"] for r in rows} == {"applied"}
    for row in rows:
        norm, scale = float(row["global_norm"]), float(row["scale"])
        assert scale == min(1.0, 0.5 / norm) or abs(scale - min(1.0, 0.5 / norm)) < 1e-6
        assert int(row["clipped"]) == int(norm > 0.5)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_clipped"] == sum(int(r["clipped"]) for r in rows) > 0
    assert summary["replicas"] == 2 and summary["steps_skipped"] == 0
    assert f"steps clipped: {summary['steps_clipped']}" in r.stdout
    # Model (5) and optimizer variables (iterations, learning rate, 5 momenta) all checked across replicas.
    assert summary["variables_verified_identical"] >= 12
    assert f"replicas identical: {summary['variables_verified_identical']} variables checked" in r.stdout
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = _scalars(out / "tensorboard")
    assert sorted(tags["global_norm"]) == list(range(40))
    assert {"loss", "scale", "clip_norm"} <= set(tags)


def test_train_without_clipping_and_bad_flags(tmp_path):
    r = _run([sys.executable, "-m", "distclip", "train", "--steps", "20", "--clip-norm", "none", "--strategy", "default",
              "--out", str(tmp_path / "noclip")])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "noclip" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["scale"]) == 1.0 and r["clipped"] == "0" for r in rows)
    assert "clip_norm=None" in r.stdout

    bad = _run([BIN, "train", "--clip-norm", "-1"])
    assert bad.returncode == 2 and "--clip-norm must be a positive finite number, 'none' or a policy" in bad.stderr


@pytest.mark.parametrize("fit", [False, True], ids=["loop", "fit"])
def test_train_multiworker_two_processes(tmp_path, fit):
    """--strategy multiworker from TF_CONFIG: same summary on both workers, files from worker 0 only; with
    --fit (Keras's fit, which fails there without the fix ClipOptimizer installs under the strategy,
    keras-team/keras#20585) the same norms and held-out MSE as --fit under MirroredStrategy."""
    sys.path.insert(0, TESTS)
    from procs import free_ports, run_all

    # --noise-scale: under --fit ClipLogger checks its batch against what fit fed each worker (x2 workers).
    args = ["train", "--steps", "15", "--clip-norm", "0.5", "--nan-at", "5", "--noise-scale"] + (["--fit"] if fit else [])
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    commands, envs = [], []
    for i in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        envs.append(dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL="2"))
        commands.append([BIN, *args, "--strategy", "multiworker", "--out", str(tmp_path / f"w{i}")])
    results = run_all(commands, envs, timeout=240)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"worker {i}: {r.stdout[-3000:]}"
    summaries = [r.stdout[r.stdout.index("distclip train:"):].splitlines()[:5] for r in results]
    assert summaries[0] == summaries[1]
    assert "MultiWorkerMirroredStrategy x2" in summaries[0][0]
    assert "gradient noise scale B_simple:" in results[0].stdout
    assert "outputs: written by rank 0" in results[1].stdout  # worker 1's --out was never made
    # Worker 0 names worker 1's replica as the source of step 5's NaN (its batch's last rows).
    assert "step 5 skipped: non-finite gradients from replica 1 (worker 1, host " in results[0].stdout
    assert (tmp_path / "w0" / "metrics.csv").exists() and not (tmp_path / "w1").exists()
    if fit:
        r = _run([BIN, *args, "--strategy", "mirrored", "--out", str(tmp_path / "mirrored")])
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("w0", "mirrored")]
        assert [float(a["global_norm"]) for a in rows[0]] == pytest.approx([float(b["global_norm"]) for b in rows[1]],
                                                                           rel=1e-5, nan_ok=True)
        held_out = [json.loads((tmp_path / d / "summary.json").read_text())["eval_mse"] for d in ("w0", "mirrored")]
        assert held_out[0] == pytest.approx(held_out[1], rel=1e-5)


def test_train_tpu_without_a_tpu_fails_clearly(tmp_path):
    r = _run([BIN, "train", "--strategy", "tpu", "--steps", "1", "--out", str(tmp_path / "tpu")])
    assert r.returncode != 0
    assert "--strategy tpu: no TPU could be reached" in r.stderr


def test_train_fit_equals_the_custom_loop(tmp_path):
    """`distclip train --fit` (model.fit, ClipOptimizer, ClipLogger) sees the custom loop's norms and ends the same,
    a rewind included: step 25's spike goes back to the snapshot before step 15 and skips steps 26 to 28."""
    args = ["train", "--steps", "30", "--clip-norm", "0.5", "--seed", "3", "--rewind", "5,2,3", "--rewind-window", "10",
            "--spike-at", "25"]
    runs = {}
    for name, extra in (("loop", []), ("fit", ["--fit"])):
        r = _run([BIN] + args + extra + ["--out", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
        with open(tmp_path / name / "metrics.csv") as f:
            runs[name] = (list(csv.DictReader(f)), json.loads((tmp_path / name / "summary.json").read_text()))
    (loop_rows, loop_sum), (fit_rows, fit_sum) = runs["loop"], runs["fit"]
    assert [r["step"] for r in fit_rows] == [r["step"] for r in loop_rows]
    for a, b in zip(loop_rows, fit_rows):
        assert abs(float(a["global_norm"]) - float(b["global_norm"])) <= 1e-4 * float(a["global_norm"])
        assert a["clipped"] == b["clipped"] and a["skipped"] == b["skipped"] and a["action"] == b["action"]
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-4 * max(1.0, float(a["loss"]))  # each step's own
    # The spike and the steps skipped after it are marked, and neither counts as clipped.
    assert [(r["action"], r["skipped"], r["clipped"]) for r in loop_rows[24:30]] == [
        ("applied", "0", loop_rows[24]["clipped"]), ("rewound", "1", "0"), ("skipped", "1", "0"),
        ("skipped", "1", "0"), ("skipped", "1", "0"), ("applied", "0", loop_rows[29]["clipped"])]
    assert loop_sum["steps_skipped_by_rewind"] == fit_sum["steps_skipped_by_rewind"] == 4
    assert fit_sum["steps_clipped"] == loop_sum["steps_clipped"] > 0
    assert abs(fit_sum["eval_mse"] - loop_sum["eval_mse"]) <= 1e-4
    assert abs(fit_sum["final_loss"] - loop_sum["final_loss"]) <= 1e-4
    assert (tmp_path / "fit" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"global_norm", "clip_norm", "scale", "skipped"} <= set(_scalars(tmp_path / "fit" / "tensorboard"))
    line = "step 25: spike: rewound to the snapshot before step 15, steps 26 to 28 skipped; steps 15 to 28 not learned from"
    for name, (_, summary) in runs.items():
        assert [r["line"] for r in summary["rewinds"]] == [line], name
        with open(tmp_path / name / "rewinds.csv") as f:
            assert list(csv.reader(f)) == [["step", "to_step", "skip_through_step", "stopped"], ["25", "15", "28", "0"]]


TINY = ["train", "--length", "5", "--units", "4", "--batch-size", "8"]


def test_train_skips_a_spike(tmp_path):
    """`--skip-spikes`: step 25's spike is skipped on its own (nothing goes back), marked in metrics.csv, said on
    stderr and counted in the summary."""
    r = _run([BIN, *TINY, "--steps", "30", "--skip-spikes", "6,10", "--spike-at", "25", "--out", str(tmp_path / "s")])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    with open(tmp_path / "s" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(i, row["action"]) for i, row in enumerate(rows) if row["action"] != "applied"] == [(25, "spike_skipped")]
    assert rows[25]["skipped"] == "1"
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["spikes_skipped"] == 1 and summary["steps_skipped_by_rewind"] == 0 and summary["rewinds"] == []
    assert "spikes skipped (--skip-spikes): 1" in r.stdout
    assert f"step 25 skipped: a spike (global norm {float(rows[25]['global_norm']):.6g}" in r.stderr


def test_train_with_zclip_agc_and_clip_groups(tmp_path):
    """`--clip-norm zclip --agc 0.1`, in the loop and in `fit`: step 0's norm is what numpy AGC leaves of the
    step's gradient, and each step's threshold and clipped norm are the reference ZClip's, fed the logged norms
    (a fixed clip_norm 1.0 differs on 15 of the 40 steps). `--clip-group`: step 0's groups' norms and the norm
    after their clip, from the same gradient."""
    sys.path.insert(0, TESTS)
    import numpy as np
    from reference_agc import agc
    from reference_zclip import ReferenceZClip

    from distclip.train import adding

    runs = {}
    for name, extra in (("loop", []), ("fit", ["--fit"])):
        r = _run([BIN, *TINY, "--steps", "40", "--clip-norm", "zclip", "--agc", "0.1", "--spike-at", "35",
                  *extra, "--out", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
        assert "clip_norm=zclip, AGC 0.1, 40 steps" in r.stdout
        with open(tmp_path / name / "metrics.csv") as f:
            runs[name] = list(csv.DictReader(f))
        assert json.loads((tmp_path / name / "summary.json").read_text())["agc"] == 0.1
    model = adding.model(5, 4, 0, 1.0)
    x, y = adding.batch(0, 0, 8, 5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    clipped, units = agc([g.numpy() for g in grads], [v.numpy() for v in model.trainable_variables], 0.1)
    assert sum(units) > 0  # AGC clips some unit of step 0's gradient
    rows = runs["loop"]
    assert float(rows[0]["global_norm"]) == pytest.approx(np.sqrt(sum(np.sum(g * g) for g in clipped)), rel=1e-5)
    zclip = ReferenceZClip()
    for row in rows:
        norm = float(row["global_norm"])
        # After the warm-up, a step ZClip leaves alone records the bound above which it would have clipped.
        bound = min(zclip.mean + 2.5 * (zclip.var ** 0.5 + 1e-6), 1.0) if zclip.initialized else 1.0
        want = zclip.step(norm)
        assert norm * float(row["scale"]) == pytest.approx(want, rel=1e-5), row
        assert float(row["clip_norm"]) == pytest.approx(want if want < norm else bound, rel=1e-5), row
    assert [float(a["global_norm"]) for a in runs["fit"]] == pytest.approx([float(b["global_norm"]) for b in rows],
                                                                           rel=1e-4)

    # --clip-group: step 0's groups' norms are those of the same gradient, grouped by the patterns in numpy.
    groups = {".*/recurrent_kernel": 0.01, "adding_rnn/dense/.*": 0.02}
    r = _run([BIN, *TINY, "--steps", "3", *[f for p, c in groups.items() for f in ("--clip-group", f"{p}={c}")],
              "--out", str(tmp_path / "groups")])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "clip_norm=1.0, .*/recurrent_kernel=0.01, adding_rnn/dense/.*=0.02, 3 steps" in r.stdout
    with open(tmp_path / "groups" / "group_norms.csv") as f:
        logged = [row for row in csv.DictReader(f) if row["step"] == "0"]
    members = [[1], [3, 4], [0, 2]]  # the recurrent kernel; the dense layer; the rest (the default group)
    norms = [float(np.sqrt(sum(np.sum(grads[i].numpy() ** 2) for i in m))) for m in members]
    assert [row["group"] for row in logged] == [*groups, "default"]
    assert [float(row["norm"]) for row in logged] == pytest.approx(norms, rel=1e-5)
    after = np.sqrt(sum(min(n, c) ** 2 for n, c in zip(norms, [*groups.values(), 1.0], strict=True)))
    with open(tmp_path / "groups" / "metrics.csv") as f:
        assert float(next(csv.DictReader(f))["global_norm"]) == pytest.approx(after, rel=1e-5)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_never_clobbers_another_runs_folder(tmp_path):
    """A run holds --out while it lives: a second run on it is refused at once, naming the holder's process id.
    A new run into a finished run's folder is refused before it writes anything (every file byte-identical);
    with --move-aside it moves the old outputs, unchanged, into OUT/aside-1/. (SIGKILL, then --resume:
    tests/scenarios/test_resume.py.)"""
    out = tmp_path / "run"
    first = subprocess.Popen([BIN, *TINY, "--steps", "60", "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the folder, however fast this machine is
        try:
            second = _run([BIN, *TINY, "--steps", "60", "--out", str(out)])
        finally:
            first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 1
    assert f"--out {out} is in use by another distclip train run (process {first.pid})" in second.stderr, \
        second.stderr[-2000:]
    assert "outputs:" not in second.stdout

    finished = _files(out)
    assert {"metrics.csv", "summary.json", "checkpoints/ckpt-60.index", "checkpoints/config.json"} <= set(finished)
    again = _run([BIN, *TINY, "--steps", "20", "--seed", "4", "--out", str(out)])
    assert again.returncode == 1 and f"--out {out} holds another run's outputs (checkpoints, metrics.csv" in \
        again.stderr and "--resume, give another --out, or pass --move-aside" in again.stderr, again.stderr[-2000:]
    assert _files(out) == finished

    aside = _run([BIN, *TINY, "--steps", "20", "--seed", "4", "--out", str(out), "--move-aside"])
    assert aside.returncode == 0, aside.stderr[-3000:]
    assert f"moved the earlier run's outputs into {out / 'aside-1'}" in aside.stderr
    assert _files(out / "aside-1") == {k: v for k, v in finished.items() if k != ".distclip.lock"}
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 20


def test_settings_that_would_be_ignored_or_cannot_work_are_refused_before_training(tmp_path):
    r = _run([BIN, *TINY, "--steps", "3", "--noise-scale", "--replicas", "1", "--out", str(tmp_path / "noise")])
    assert r.returncode == 2 and "--noise-scale needs 2 or more replicas" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "noise").exists()
