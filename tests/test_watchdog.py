"""distclip.watchdog: a rank that exits early with status 0, never starts, or is stopped ends the run, named.

Real horovodrun and mpirun launches (through launch/horovodrun.sh and launch/mpirun.sh) of tiny Python ranks
that ignore SIGTERM; srun is in test_slurm.py. And the peer rules alone, on files.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from distclip.watchdog import Peers, _write

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STUBBORN = os.path.join(HERE, "workers", "stubborn.py")
TIMEOUT_S = 3

CASES = {
    "exits-early-with-status-0": ("exit0", r"rank 1 exited with status 0 while this rank still ran for 3 s"),
    "stopped": ("stop", r"rank 1 is stopped \(SIGSTOP\) and does not answer while this rank still ran for 3 s"),
}


def watchdog_env(tmp_path):
    return dict(os.environ, NP="2", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, TMPDIR=str(tmp_path),
                DISTCLIP_WATCHDOG_TIMEOUT=str(TIMEOUT_S))


def run_bounded(cmd, env, bound=60):
    start = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=bound + 60, start_new_session=True)
    return r.returncode, time.monotonic() - start, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_rank_the_others_would_wait_for_forever_ends_the_run(tmp_path, script, case):
    mode, message = CASES[case]
    code, took, output = run_bounded([os.path.join(ROOT, "launch", script), sys.executable, STUBBORN, mode],
                                     watchdog_env(tmp_path))
    assert code != 0 and took < 40, (code, took, output[-3000:])
    assert re.search(r"distclip\.watchdog \(rank 0\): " + message + "; stopping this rank", output), output[-3000:]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".distclip-watchdog")], "the folder is left"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_a_rank_that_never_starts_ends_the_run(tmp_path, launcher):
    env = watchdog_env(tmp_path)
    env["DISTCLIP_WATCHDOG_DIR"] = str(tmp_path / "watchdog")
    # Rank 1 hangs before its watchdog starts (a wrapper stuck on a slow file system, say).
    rank = "${HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}"
    wrapped = ["sh", "-c", f'[ "{rank}" = 1 ] && exec sleep 300; exec "$0" -m distclip.watchdog -- "$0" {STUBBORN} none',
               sys.executable]
    bin_dir = os.path.dirname(sys.executable)
    cmd = {"horovodrun": [os.path.join(bin_dir, "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"],
           "mpirun": ["mpirun", "-np", "2", "--oversubscribe", "-x", "DISTCLIP_WATCHDOG_DIR", "-x",
                      "DISTCLIP_WATCHDOG_TIMEOUT", "-x", "PYTHONPATH"]}[launcher]
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    code, took, output = run_bounded([sys.executable, "-m", "distclip.netns"] + cmd + wrapped, env)
    assert code != 0 and took < 40, (code, took, output[-3000:])
    assert "distclip.watchdog (rank 0): rank 1 never started (no state in" in output, output[-3000:]


def _peers(tmp_path, states):
    for rank, (beat, state) in states.items():
        _write(str(tmp_path / f"rank-{rank}"), beat, state)
    return Peers(str(tmp_path), 0, 1 + len(states))


def test_peer_rules(tmp_path):
    peers = _peers(tmp_path, {1: (5, "running"), 2: (7, "running")})
    assert peers.problem(now=100.0, started=0.0, timeout=10) is None
    assert peers.problem(now=109.0, started=0.0, timeout=10) is None
    _write(str(tmp_path / "rank-1"), 6, "running")  # rank 1 beats, rank 2 does not
    assert peers.problem(now=110.5, started=0.0, timeout=10) == "rank 2 stopped answering (no heartbeat for 10 s)"

    peers = _peers(tmp_path, {1: (1, "exited 0"), 2: (1, "running")})
    assert peers.problem(now=1.0, started=0.0, timeout=10) is None
    _write(str(tmp_path / "rank-2"), 2, "running")
    assert peers.problem(now=11.5, started=0.0, timeout=10) == "rank 1 exited with status 0 while this rank still ran for 10 s"

    peers = _peers(tmp_path, {1: (3, "exited -9"), 2: (1, "running")})
    assert peers.problem(now=1.0, started=0.0, timeout=10) == "rank 1 killed by SIGKILL"
    peers = _peers(tmp_path, {1: (3, "exited 3"), 2: (1, "running")})
    assert peers.problem(now=1.0, started=0.0, timeout=10) == "rank 1 exited with status 3"

    peers = _peers(tmp_path, {1: (3, "stopped"), 2: (1, "running")})
    for now in (1.0, 5.0, 10.9):
        _write(str(tmp_path / "rank-1"), int(now * 10), "stopped")  # its watchdog still beats
        _write(str(tmp_path / "rank-2"), int(now * 10), "running")
        assert peers.problem(now=now, started=0.0, timeout=10) is None
    _write(str(tmp_path / "rank-1"), 200, "running")  # continued: waited on again from scratch
    assert peers.problem(now=12.0, started=0.0, timeout=10) is None

    os.remove(tmp_path / "rank-2")
    peers = Peers(str(tmp_path), 0, 3)
    assert peers.problem(now=9.0, started=0.0, timeout=10) is None
    assert peers.problem(now=10.5, started=0.0, timeout=10).startswith("rank 2 never started (no state in")


@pytest.mark.parametrize("argv, env, message", [
    (["--", "true"], {"DISTCLIP_WATCHDOG_TIMEOUT": "abc"}, "DISTCLIP_WATCHDOG_TIMEOUT must be a number of seconds > 0; got DISTCLIP_WATCHDOG_TIMEOUT='abc'"),
    (["--timeout", "0", "--", "true"], {}, "--timeout (or DISTCLIP_WATCHDOG_TIMEOUT) must be a number of seconds > 0; got 0.0"),
    (["--grace", "-1", "--", "true"], {}, "--grace must be a number of seconds > 0; got -1.0"),
    (["--"], {}, "give the command to run after --"),
])
def test_bad_arguments_are_named(tmp_path, monkeypatch, capsys, argv, env, message):
    from distclip.watchdog import main

    monkeypatch.setenv("DISTCLIP_WATCHDOG_DIR", str(tmp_path / "w"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_single_process_runs_its_command_and_cleans_up(tmp_path):
    from distclip.watchdog import watch

    folder = tmp_path / "w"
    assert watch([sys.executable, "-c", "import sys; sys.exit(3)"], str(folder), timeout=5) == 3
    assert not folder.exists()
