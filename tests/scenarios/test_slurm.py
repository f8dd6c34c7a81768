"""The sbatch templates, submitted for real to a single-node Slurm cluster started here; and srun failures."""
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from common import check_multiworker_outputs, max_abs_diff, reference_train
from slurm_cluster import SlurmCluster
from procs import ROOT, WORKERS

# Its module-scoped fixtures are made once: under pytest-xdist every test of the module runs in one worker.
pytestmark = pytest.mark.xdist_group("slurm")


VENV = sys.prefix  # the venv running the tests


def _munge_default_files():
    """Files in munge's default runtime, state and log folders, with their modification times."""
    found = {}
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                found[os.path.join(folder, name)] = os.stat(os.path.join(folder, name)).st_mtime_ns
    return found


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    before = _munge_default_files()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
    # The cluster kept its munged's socket, pid, log and seed in its scratch folder.
    assert _munge_default_files() == before


def _watchdog_parent(tmp_path):
    """The parent folder given to the templates' watchdogs, holding a file of the user's that must survive."""
    parent = tmp_path / "watchdog"
    parent.mkdir(exist_ok=True)
    (parent / "users-file").write_text("keep")
    return parent


def _submit(slurm, template, tmp_path, command, script_args=()):
    out = tmp_path / "job.out"
    env = {"DISTCLIP_CMD": command, "DISTCLIP_VENV": VENV, "PYTHONPATH": ROOT,
           "DISTCLIP_WATCHDOG_DIR": str(_watchdog_parent(tmp_path))}
    r = slurm.sbatch_wait(os.path.join(ROOT, "slurm", template),
                          ["--nodes=1", "--ntasks-per-node=2", f"--output={out}", f"--chdir={ROOT}"], env,
                          script_args=script_args)
    log = out.read_text() if out.exists() else ""
    assert r.returncode == 0, f"sbatch --wait {template} failed ({r.returncode}): {r.stdout}\n{log[-4000:]}\n{slurm.logs()}"
    return log


@pytest.mark.parametrize("template, env_launcher", [("horovod-srun.sbatch", "slurm"), ("horovod-horovodrun.sbatch", "horovodrun")])
def test_horovod_templates(slurm, tmp_path, template, env_launcher):
    worker = os.path.join(WORKERS, "horovod_train.py")
    _submit(slurm, template, tmp_path, f"python {worker} {tmp_path / 'out'} 0.2 4")
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    ref_weights, ref_norms = reference_train(0.2, 4)
    for r in ranks:
        assert max_abs_diff([np.array(w, "float32") for w in r["weights"]], ref_weights) <= 1e-5
        assert r["norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert r["verified"] == "ok" and r["env_cluster"]["launcher"] == env_launcher
        assert r["env_cluster"]["size"] == 2 and r["env_cluster"]["rank"] == r["rank"]
    assert ranks[0]["norms"] == ranks[1]["norms"] and ranks[0]["weights"] == ranks[1]["weights"]


def test_multiworker_template(slurm, tmp_path):
    worker = os.path.join(WORKERS, "multiworker_train.py")
    log = _submit(slurm, "multiworker-srun.sbatch", tmp_path, f"python {worker} {tmp_path / 'w{rank}.json'} 0.2 4")
    assert "2 workers on" in log
    check_multiworker_outputs([tmp_path / "w0.json", tmp_path / "w1.json"], 0.2, 4)


def test_multiworker_template_runs_keras_fit(slurm, tmp_path):
    """`model.fit` with ClipOptimizer under MultiWorkerMirroredStrategy, started by the template's srun: the weights
    of single-device `fit` with Keras's global_clipnorm on the global batch (Keras's fit fixed by ClipOptimizer,
    created under the strategy, and not by the import)."""
    worker = os.path.join(WORKERS, "fit_train.py")
    log = _submit(slurm, "multiworker-srun.sbatch", tmp_path, f"python {worker} multiworker {tmp_path} 0.3 4")
    ref_weights, _ = reference_train(0.3, 4, "adam")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["keras_fix"] for r in ranks] == [[False, True]] * 2, log[-3000:]
    for r in ranks:
        assert max_abs_diff([np.array(w, "float32") for w in r["weights"]], ref_weights) <= 1e-5
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.parametrize("template, how", [
    ("horovod-srun.sbatch", "arguments"), ("multiworker-srun.sbatch", "arguments"),
    ("horovod-horovodrun.sbatch", "arguments"),
    ("horovod-srun.sbatch", "DISTCLIP_CMD"),  # the three templates split DISTCLIP_CMD with the same lines
])
def test_templates_keep_arguments_as_quoted(slurm, tmp_path, template, how):
    """An argument with a space, a glob character and a $ reach every task unchanged."""
    (tmp_path / "x.py").write_text("")  # something for '*' to match, were it globbed
    args = [os.path.join(VENV, "bin", "python"), os.path.join(WORKERS, "argv.py"), str(tmp_path),
            "a b", "*", "$HOME"]
    if how == "arguments":
        _submit(slurm, template, tmp_path, "", script_args=args)
    else:
        _submit(slurm, template, tmp_path, shlex.join(args))
    for rank in ("0", "1"):
        assert json.loads((tmp_path / rank).read_text()) == ["a b", "*", "$HOME"]


def test_killed_rank_under_srun_ends_the_step(slurm, tmp_path):
    from procs import BOUND_S, kill_rank_and_wait

    env = dict(slurm.env, TF_CPP_MIN_LOG_LEVEL="2", PATH=os.path.join(VENV, "bin") + os.pathsep + os.environ["PATH"])
    srun = ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "-n", "2"]
    code, elapsed, output = kill_rank_and_wait(tmp_path, srun, "horovod", env)
    assert code != 0 and elapsed < BOUND_S, (code, elapsed)
    assert re.search(r"srun: error: \S+: task 1: Killed", output), output[-3000:]


@pytest.mark.parametrize("template, strategy", [("multiworker-srun.sbatch", "multiworker"),
                                                ("horovod-horovodrun.sbatch", "horovod")])
def test_sigterm_checkpoints_requeues_and_resumes(slurm, tmp_path, template, strategy):
    """What the templates' --signal=B:TERM@120 does before a time limit, sent by hand: the batch script passes
    SIGTERM to the ranks (srun's tasks through scancel; horovodrun's ranks directly), every rank checkpoints
    after the same step and exits 143, the script requeues the job, and the requeued job resumes and finishes.
    Under MultiWorkerMirroredStrategy the result equals an uninterrupted run bit for bit."""
    from scenarios.test_resume import JOB, STEPS, _assert_same_run, _lines

    out, log = tmp_path / "run", tmp_path / "job.out"
    command = shlex.join(["distclip", *JOB, "--strategy", strategy, "--out", str(out), "--resume"])
    env = {"DISTCLIP_CMD": command, "DISTCLIP_VENV": VENV, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path),
           "DISTCLIP_WATCHDOG_DIR": str(_watchdog_parent(tmp_path))}
    job = slurm.submit(os.path.join(ROOT, "slurm", template),
                       ["--nodes=1", "--ntasks-per-node=2", f"--output={log}", f"--chdir={ROOT}"], env)
    deadline = time.monotonic() + 120
    while _lines(out / "metrics.csv") < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _lines(out / "metrics.csv") >= 5, f"training never started:\n{log.read_text()[-3000:]}\n{slurm.logs()}"
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=slurm.env, check=True, timeout=30)
    deadline = time.monotonic() + 240  # the requeued job waits for the old credential to expire (cred_expire=10)
    while slurm.job(job)["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and time.monotonic() < deadline:
        time.sleep(1)
    fields, text = slurm.job(job), log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, text[-4000:], slurm.logs())
    stopped = re.search(rf"stopped by SIGTERM after step (\d+) of {STEPS}", text)
    assert stopped and f"requeueing job {job}" in text, text[-4000:]
    assert f"resuming at step {stopped.group(1)} from {out / 'checkpoints'}" in text, text[-4000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    if strategy == "multiworker":
        reference = tmp_path / "reference"
        r = subprocess.run([os.path.join(ROOT, "launch", "multiworker.sh"), "distclip", *JOB, "--strategy", strategy,
                            "--out", str(reference)], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", NP="2"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        _assert_same_run(reference, out)



@pytest.mark.parametrize("case", ["exits-early-with-status-0", "stopped"])
def test_a_rank_the_others_would_wait_for_forever_ends_the_job(slurm, tmp_path, case):
    """srun ends a step when a task fails, not when one exits with status 0 early or is stopped: the
    template's watchdog does, naming the rank (see test_watchdog.py)."""
    from scenarios.test_watchdog import CASES, STUBBORN, TIMEOUT_S

    mode, message = CASES[case]
    out = tmp_path / "job.out"
    env = {"DISTCLIP_VENV": VENV, "PYTHONPATH": ROOT, "DISTCLIP_WATCHDOG_TIMEOUT": str(TIMEOUT_S),
           "DISTCLIP_WATCHDOG_DIR": str(_watchdog_parent(tmp_path))}
    start = time.monotonic()
    r = slurm.sbatch_wait(os.path.join(ROOT, "slurm", "horovod-srun.sbatch"),
                          ["--nodes=1", "--ntasks-per-node=2", f"--output={out}", f"--chdir={ROOT}"], env,
                          timeout=180, script_args=[os.path.join(VENV, "bin", "python"), STUBBORN, mode])
    took = time.monotonic() - start
    log = out.read_text(errors="replace")
    assert r.returncode != 0 and took < 60, (r.returncode, took, log[-3000:])
    assert re.search(r"distclip\.cluster\.watchdog \(rank 0\): " + message + "; stopping this rank", log), log[-3000:]
    assert os.listdir(tmp_path / "watchdog") == ["users-file"]  # the watchdog's own folder is gone, nothing else


def _steps_of(cluster, job):
    """The cluster's slurmstepd processes of `job` ("slurmstepd: [JOB.batch]", "[JOB.0]"): an earlier test's
    steps may still be ending."""
    import psutil

    found = []
    for p in cluster._new_steps():
        try:
            if any(a.startswith(f"[{job}.") for a in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def _settled_steps(cluster, job, deadline):
    """The job's step processes once the same for a second (slurmstepd forks briefly while launching)."""
    while time.monotonic() < deadline:
        before = {p.pid for p in _steps_of(cluster, job)}
        time.sleep(1.0)
        now = _steps_of(cluster, job)
        if before and before == {p.pid for p in now} and len(now) >= 2:  # the batch step and step 0
            return now
    raise AssertionError(f"the job steps never settled:\n{cluster.logs()}")


def test_stopping_a_cluster_leaves_another_clusters_job_steps_alone(slurm, tmp_path):
    """Two test runs at once on one machine: stopping one's cluster kills its own job steps and no one else's."""
    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/bash\nsrun -n 1 sleep 120\n")
    other = SlurmCluster(tmp_path / "other").start()
    try:
        jobs = {c: c.submit(str(script), [f"--output={tmp_path / f'sleep-{i}.out'}"], {})
                for i, c in enumerate((slurm, other))}
        deadline = time.monotonic() + 60
        theirs, ours = _settled_steps(slurm, jobs[slurm], deadline), _settled_steps(other, jobs[other], deadline)
        assert not {p.pid for p in theirs} & {p.pid for p in ours}
    finally:
        other.stop()
    assert {p.pid for p in _steps_of(slurm, jobs[slurm])} == {p.pid for p in theirs}  # the other cluster's live on
    assert all(p.is_running() for p in theirs) and not any(p.is_running() for p in ours)
    subprocess.run(["scancel", jobs[slurm]], env=slurm.env, check=True, timeout=30)
    deadline = time.monotonic() + 30
    while _steps_of(slurm, jobs[slurm]) and time.monotonic() < deadline:
        time.sleep(0.2)
