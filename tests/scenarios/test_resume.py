"""Preemption-safe `distclip train`: SIGTERM checkpoints and exits 143, and `--resume` continues bit-identically.

Each case runs the same job three times in its own processes: uninterrupted;
interrupted (SIGTERM, or SIGKILL after a periodic checkpoint); resumed. The
resumed run's final checkpoint (weights, optimizer slots and `iterations`,
the ClipStep counters) must equal the uninterrupted run's bit for bit, and so
must metrics.csv.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from procs import ROOT, rank_process

# Its module-scoped fixtures are made once: under pytest-xdist every test of the module runs in one worker.
pytestmark = pytest.mark.xdist_group("resume")


BIN = os.path.join(os.path.dirname(sys.executable), "distclip")
HOROVODRUN = os.path.join(ROOT, "launch", "horovodrun.sh")
STEPS, EVERY = 400, 100
SETTINGS = ["--length", "10", "--units", "8", "--batch-size", "16", "--checkpoint-every", str(EVERY)]
JOB = ["train", "--steps", str(STEPS), *SETTINGS]


def _env(tmp_path):
    # A killed worker's leftovers (TensorFlow's and Horovod's temporary files) stay in the test's folder.
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", NP="2", TMPDIR=str(tmp))


def _command(backend, out, *extra):
    if backend == "horovod":
        return [HOROVODRUN, BIN, *JOB, "--strategy", "horovod", "--out", str(out), *extra]
    fit = ["--fit"] if backend == "mirrored-fit" else []
    return [BIN, *JOB, "--strategy", "mirrored", "--out", str(out), *fit, *extra]


def _run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _interrupt(cmd, env, out, how, victim=None):
    """Starts `cmd`, and once training is under way sends `how` to `victim(out)` (default: the process started).

    Returns (exit code, seconds from the signal to the end, output)."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w+", errors="replace") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            # SIGTERM once a step is done (every rank's handler is set by then); SIGKILL after the first checkpoint.
            wanted = (lambda: _lines(out / "metrics.csv") >= 2) if how == signal.SIGTERM else (
                lambda: (out / "checkpoints" / "checkpoint").exists())  # written last: the first checkpoint is complete
            while not wanted() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            target = p if victim is None else victim(out)
            assert target is not None and p.poll() is None, f"training never started:\n{open(log).read()[-3000:]}"
            target.send_signal(how)
            sent = time.monotonic()
            code = p.wait(timeout=120)
            took = time.monotonic() - sent
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        f.seek(0)
        return code, took, f.read()


def _lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _state(out):
    """Every saved tensor of the newest checkpoint in `out`, by name (the checkpoint's own counter aside)."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(out / "checkpoints")))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if "save_counter" not in n and n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _assert_same_run(reference, resumed, fit=False):
    a, b = _state(reference), _state(resumed)
    assert sorted(a) == sorted(b)
    if fit:
        # Under fit each step's loss is read back from fit's running mean, which starts anew in the resumed
        # fit: equal to rounding, not bit for bit; so is metrics.csv's loss column (the running mean itself).
        np.testing.assert_allclose(a.pop("progress/losses/.ATTRIBUTES/VARIABLE_VALUE"),
                                   b.pop("progress/losses/.ATTRIBUTES/VARIABLE_VALUE"), atol=1e-4)
    # The weights, the momentum slots, iterations, the ClipStep's (ClipOptimizer's) state and the loop's progress.
    parts = ("optimizer/_trainable_variables/", "optimizer/_variables/", "optimizer/_iterations/", "progress/step/")
    parts += ("optimizer/inner_optimizer/_variables/",) if fit else ("clip/skipped_steps/",)
    for part in parts:
        assert any(n.startswith(part) for n in a), (part, sorted(a))
    differ = [n for n in a if not np.array_equal(a[n], b[n])]
    assert not differ, f"differ after resuming: {differ}"
    if not fit:
        assert (reference / "metrics.csv").read_bytes() == (resumed / "metrics.csv").read_bytes()
    else:
        rows = [[r.split(",") for r in (d / "metrics.csv").read_text().splitlines()] for d in (reference, resumed)]
        assert len(rows[0]) == STEPS + 1
        assert [r[:1] + r[2:] for r in rows[0]] == [r[:1] + r[2:] for r in rows[1]]


def _rank1(out):
    return rank_process(str(out), 1)


def _mirrored_process(out):
    import psutil

    for p in psutil.process_iter():
        try:
            args = p.cmdline()
            if len(args) > 2 and args[1].endswith("distclip") and str(out) in args:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of an backend, made once and shared by the cases that interrupt it."""
    runs = {}

    def get(backend):
        if backend not in runs:
            folder = tmp_path_factory.mktemp(f"uninterrupted-{backend}")
            _run(_command(backend, folder / "run"), _env(folder))
            runs[backend] = folder / "run"
        return runs[backend]

    return get


@pytest.mark.parametrize("backend, how", [
    ("mirrored", signal.SIGTERM),
    ("mirrored", signal.SIGKILL),
    ("horovod", signal.SIGTERM),
    ("mirrored-fit", signal.SIGTERM),
], ids=["mirrored-SIGTERM", "mirrored-SIGKILL-after-a-periodic-checkpoint", "horovodrun-SIGTERM-to-rank-1-only",
        "mirrored-fit-SIGTERM"])
def test_interrupted_run_resumes_bit_identically(tmp_path, backend, how, uninterrupted):
    env = _env(tmp_path)
    reference, resumed = uninterrupted(backend), tmp_path / "resumed"

    victim = _rank1 if backend == "horovod" else _mirrored_process
    code, _, output = _interrupt(_command(backend, resumed), env, resumed, how, victim)
    if how == signal.SIGTERM:
        stopped = re.search(rf"stopped by SIGTERM after step (\d+) of {STEPS}; checkpoint in ", output)
        assert stopped, output[-3000:]
        at = int(stopped.group(1))
        assert 0 < at < STEPS
        if backend == "horovod":  # horovodrun reports the ranks' status 143 its own way
            assert code != 0 and re.search(r"Process name: [01]\s+Exit code: 143", output), output[-3000:]
        else:
            assert code == 143
        # (Under horovodrun rank 1 alone was signalled: both ranks stopped after the same step, rank 0 saved.)
        assert int(_state(resumed)["progress/step/.ATTRIBUTES/VARIABLE_VALUE"]) == at
    else:
        assert code == -signal.SIGKILL
        # Killed once the first checkpoint was complete: the newest one is where the resume starts.
        at = int(tf.train.latest_checkpoint(str(resumed / "checkpoints")).rsplit("-", 1)[1])
        assert at % EVERY == 0 and 0 < at < STEPS, at
        # The killed run's lock died with it; the file it leaves does not block --resume (nor should it).
        assert (resumed / ".distclip.lock").exists()
    assert "resuming" not in output

    r = _run(_command(backend, resumed, "--resume"), env)
    assert f"resuming at step {at} from {resumed / 'checkpoints'}" in r.stderr + r.stdout
    _assert_same_run(reference, resumed, fit=backend == "mirrored-fit")


def test_resume_refuses_other_settings_and_starts_fresh_without_a_checkpoint(tmp_path):
    """Every changed setting is refused by name before a checkpoint is read, also when the run's config.json was
    written by an older distclip that lacked the key (0.2.0 had no --rewind, --nan-at, --noise-scale: they count as
    off); with the same settings such a run resumes."""
    env = _env(tmp_path)
    out = tmp_path / "run"
    job = ["train", "--length", "5", "--units", "4", "--out", str(out), "--resume"]
    r = subprocess.run([BIN, *job, "--steps", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and f"no checkpoint in {out / 'checkpoints'}; starting at step 0" in r.stderr
    config = json.loads((out / "checkpoints" / "config.json").read_text())
    for key in ("rewind", "rewind_factor", "rewind_window", "nan_at", "spike_at", "noise_scale", "move_aside"):
        del config[key]  # as distclip 0.2.0 wrote it
    (out / "checkpoints" / "config.json").write_text(json.dumps(config))
    before = _files(out)
    r = subprocess.run([BIN, *job, "--steps", "5", "--units", "6", "--rewind", "2,1,0", "--nan-at", "4"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "was written with other settings (config.json):\n" \
           "  --nan-at: the run was started with (not set) (not in its config.json: an older distclip, which ran " \
           "with the default), this run has 4\n" \
           "  --rewind: the run was started with (not set) (not in its config.json: an older distclip, which ran " \
           "with the default), this run has 2,1,0; --rewind adds state to the checkpoint" in r.stderr, r.stderr[-2000:]
    assert "  --units: the run was started with 4, this run has 6\n" in r.stderr
    assert "The checkpoints are fine and were not touched" in r.stderr and "can be read" not in r.stderr
    assert _files(out) == before
    r = subprocess.run([BIN, *job, "--steps", "5"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and f"resuming at step 3 from {out / 'checkpoints'}" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("script, strategy", [("multiworker.sh", "multiworker"), ("horovodrun.sh", "horovod")])
def test_sigterm_to_the_launch_script_checkpoints_every_rank(tmp_path, script, strategy):
    """SIGTERM to `launch/multiworker.sh` (distclip.cluster.launcher forwards it) or `launch/horovodrun.sh` (horovodrun
    passes it to each rank's watchdog, which passes it on): every rank stops after the same step, the chief
    writes the checkpoint, and the run ends in seconds, long before any grace period would kill a rank."""
    out = tmp_path / "run"
    cmd = [os.path.join(ROOT, "launch", script), BIN, *JOB, "--strategy", strategy, "--out", str(out)]
    code, took, output = _interrupt(cmd, _env(tmp_path), out, signal.SIGTERM)
    if strategy == "multiworker":
        assert code == 143 and "killing them" not in output, (code, output[-3000:])
        # Worker 1 saved too (TensorFlow's rule), into a scratch folder it removed.
        assert not [n for n in os.listdir(tmp_path / "tmp") if n.startswith("distclip-checkpoint-")]
    else:
        # The script ends with 143 whether horovodrun reports the ranks' 143 (status 1) or, a race of its own, 0.
        assert code == 143, (code, output[-3000:])
    assert took < 25, (took, output[-3000:])
    stopped = re.search(rf"stopped by SIGTERM after step (\d+) of {STEPS}", output)
    assert stopped, output[-3000:]
    assert output.count("SIGTERM received; checkpointing after this step") == 2
    assert int(_state(out)["progress/step/.ATTRIBUTES/VARIABLE_VALUE"]) == int(stopped.group(1))


# The damage and kill cases: the job under MirroredStrategy stopped at step 200 (checkpoints 100 and 200 kept),
# resumed to STEPS; the reference is the uninterrupted mirrored run above (--steps may change on resume, and
# nothing else depends on it).
SHORT = ["train", *SETTINGS, "--strategy", "mirrored"]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, uninterrupted):
    """{"at-200": the run stopped at step 200, "reference": the uninterrupted run}"""
    base = tmp_path_factory.mktemp("short")
    _run([BIN, *SHORT, "--steps", "200", "--out", str(base / "at-200")], _env(base))
    return {"at-200": base / "at-200", "reference": uninterrupted("mirrored")}


def _copy_of_run_at_200(short_runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_runs["at-200"], out)
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint", "ckpt-100.data-00000-of-00001", "ckpt-100.index",
                                                       "ckpt-200.data-00000-of-00001", "ckpt-200.index", "config.json"]
    return out


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(3)


@pytest.mark.parametrize("damage, resumes_at", [
    ("newest-index-missing", 100),
    ("newest-data-truncated", 100),
    ("state-file-garbled", 200),
])
def test_resume_uses_the_newest_readable_checkpoint_and_keeps_a_damaged_one_aside(tmp_path, short_runs, damage,
                                                                                   resumes_at):
    out = _copy_of_run_at_200(short_runs, tmp_path)
    ckpts = out / "checkpoints"
    if damage == "newest-index-missing":
        os.remove(ckpts / "ckpt-200.index")
    elif damage == "newest-data-truncated":
        _truncate(ckpts / "ckpt-200.data-00000-of-00001")
    else:
        (ckpts / "checkpoint").write_text("garbage {{{")
    r = _run([BIN, *SHORT, "--steps", str(STEPS), "--out", str(out), "--resume"], _env(tmp_path))
    assert f"resuming at step {resumes_at} from {ckpts}" in r.stderr, r.stderr[-3000:]
    if resumes_at == 100:
        assert f"cannot read {ckpts / 'ckpt-200'} (" in r.stderr and f"moved to {ckpts / 'damaged'}" in r.stderr
        kept = ["ckpt-200.data-00000-of-00001"] + (["ckpt-200.index"] if damage == "newest-data-truncated" else [])
        assert sorted(os.listdir(ckpts / "damaged")) == kept  # set aside, not deleted
    else:
        assert "cannot read" not in r.stderr
    _assert_same_run(short_runs["reference"], out)


@pytest.mark.parametrize("damage, message", [
    ("every-checkpoint-unreadable", "no checkpoint in {ckpts} can be read:\n  {ckpts}/ckpt-200 (ckpt-200.data-00000-of-00001"
                                    ", ckpt-200.index): IndexError"),
    ("config-missing", "cannot read {ckpts}/config.json (No such file or directory)"),
    ("config-truncated", "cannot read {ckpts}/config.json (Unterminated string"),
])
def test_resume_refuses_rather_than_train_from_scratch(tmp_path, short_runs, damage, message):
    out = _copy_of_run_at_200(short_runs, tmp_path)
    ckpts = out / "checkpoints"
    if damage == "every-checkpoint-unreadable":
        for n in (100, 200):
            _truncate(ckpts / f"ckpt-{n}.data-00000-of-00001")
    elif damage == "config-missing":
        os.remove(ckpts / "config.json")
    else:
        (ckpts / "config.json").write_text('{"strategy": "mirr')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # With config.json gone, a changed setting (--seed) would go unnoticed if the check were skipped.
    seed = [] if damage == "every-checkpoint-unreadable" else ["--seed", "5"]
    r = subprocess.run([BIN, *SHORT, "--steps", str(STEPS), "--out", str(out), "--resume", *seed],
                       capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert r.returncode != 0 and message.format(ckpts=ckpts) in r.stderr, r.stderr[-3000:]
    assert "starting at step 0" not in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written, nothing deleted


def test_metrics_survive_kills_at_random_points_after_a_resume(tmp_path, short_runs):
    """SIGKILL at random moments after `--resume` has started, three times over, then a resume to the end:
    metrics.csv holds exactly the uninterrupted run's rows (the kept rows are rewritten atomically at once)."""
    out = _copy_of_run_at_200(short_runs, tmp_path)
    rng = random.Random(int(os.environ.get("DISTCLIP_TEST_SEED", time.time_ns() % 10**6)))
    cmd = [BIN, *SHORT, "--steps", str(STEPS), "--out", str(out), "--resume"]
    for _ in range(3):
        with open(tmp_path / "killed.log", "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                                 start_new_session=True)
            try:
                for line in p.stderr:  # bounded: the process ends, or is killed below
                    if "resuming at step" in line:
                        break
                time.sleep(rng.uniform(0.0, 2.0))
            finally:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
        rows = (out / "metrics.csv").read_text().splitlines()
        assert len(rows) >= 201 and rows[0].startswith("step,"), len(rows)
    _run(cmd, _env(tmp_path))
    _assert_same_run(short_runs["reference"], out)
