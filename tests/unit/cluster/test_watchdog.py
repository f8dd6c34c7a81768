"""distclip.cluster.watchdog: the rules on peers' state files, argument errors, one process (no launcher)."""
import os
import sys

import pytest

from distclip.cluster.watchdog import Peers, _write


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
    from distclip.cluster.watchdog import main

    monkeypatch.setenv("DISTCLIP_WATCHDOG_DIR", str(tmp_path / "w"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_single_process_runs_its_command_and_cleans_up(tmp_path):
    from distclip.cluster.watchdog import watch

    folder = tmp_path / "w"
    assert watch([sys.executable, "-c", "import sys; sys.exit(3)"], str(folder), timeout=5) == 3
    assert not folder.exists()
