"""distclip.cluster.watchdog: the rules on peers' state files, argument errors, one process (no launcher)."""
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from distclip.cluster.watchdog import Peers, WatchdogError, _write, make_folder, watch


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
    (["--run", "", "--", "true"], {}, "give --run or set DISTCLIP_WATCHDOG_RUN"),
])
def test_bad_arguments_are_named(tmp_path, monkeypatch, capsys, argv, env, message):
    from distclip.cluster.watchdog import main

    monkeypatch.setenv("DISTCLIP_WATCHDOG_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("DISTCLIP_WATCHDOG_RUN", "r")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_single_process_runs_its_command_and_removes_only_what_it_made(tmp_path):
    # The parent is a folder of the user's, as $PWD or $SLURM_SUBMIT_DIR would be.
    (tmp_path / "keep.txt").write_text("the user's")
    (tmp_path / "sub").mkdir()
    assert watch([sys.executable, "-c", "import sys; sys.exit(3)"], str(tmp_path), "r1", timeout=5) == 3
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sub"]
    assert (tmp_path / "keep.txt").read_text() == "the user's"

    # Something put inside the watchdog's own folder stays, and so does the folder.
    own = tmp_path / ".distclip-watchdog-r2"
    command = [sys.executable, "-c", f"open({str(own / 'model.h5')!r}, 'w').write('x')"]
    assert watch(command, str(tmp_path), "r2", timeout=5) == 0
    assert os.listdir(own) == ["model.h5"]


def test_the_folder_is_private(tmp_path):
    folder = make_folder(str(tmp_path), "run-1")
    st = os.lstat(folder)
    assert folder == str(tmp_path / ".distclip-watchdog-run-1")
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert make_folder(str(tmp_path), "run-1") == folder  # the other ranks find it, and accept it


def test_a_symlinked_state_file_is_never_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only")
    own = tmp_path / ".distclip-watchdog-r"
    own.mkdir(mode=0o700)
    os.symlink(secret, own / "rank-0")
    ran = tmp_path / "ran"
    with pytest.raises(WatchdogError, match=f"cannot write {own / 'rank-0'}: it is a symbolic link"):
        watch([sys.executable, "-c", f"open({str(ran)!r}, 'w')"], str(tmp_path), "r", timeout=5)
    assert secret.read_text() == "root only" and not ran.exists()


@pytest.mark.parametrize("setup, message", [
    (lambda p: os.symlink(p / "elsewhere", p / ".distclip-watchdog-r"), "it is not a folder"),
    (lambda p: (p / ".distclip-watchdog-r").write_text(""), "it is not a folder"),
    (lambda p: (p / ".distclip-watchdog-r").mkdir(mode=0o755), "it has mode 0755, not 0700"),
])
def test_a_folder_that_is_not_the_runs_own_is_refused(tmp_path, setup, message):
    (tmp_path / "elsewhere").mkdir()
    setup(tmp_path)
    with pytest.raises(WatchdogError, match=f"refusing the watchdog's folder {tmp_path}/.distclip-watchdog-r: {message}"):
        make_folder(str(tmp_path), "r")
    assert os.listdir(tmp_path / "elsewhere") == []


def test_a_folder_another_user_made_first_is_refused(request):
    """Another local user pre-creates the run's folder in a shared, sticky /tmp-like parent."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a step as another user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    parent = tempfile.mkdtemp(prefix="distclip-test-shared-")  # in /tmp: pytest's own folders are private
    os.chmod(parent, 0o1777)
    request.addfinalizer(lambda: shutil.rmtree(parent))
    folder = os.path.join(parent, ".distclip-watchdog-r")

    def as_nobody():
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    subprocess.run(["mkdir", "-m", "0700", folder], preexec_fn=as_nobody, check=True)
    assert os.lstat(folder).st_uid == nobody.pw_uid
    with pytest.raises(WatchdogError, match=f"it belongs to uid {nobody.pw_uid}, not to this user"):
        watch(["true"], parent, "r", timeout=5)
    assert os.listdir(folder) == []


@pytest.mark.parametrize("parent, run, message", [
    ("missing", "r", "DISTCLIP_WATCHDOG_DIR (--dir) '{p}/missing' does not exist"),
    ("file", "r", "DISTCLIP_WATCHDOG_DIR (--dir) '{p}/file' is not a folder"),
    ("open", "r", "'{p}/open' may be written by every user and has no sticky bit"),
    ("", "../x", "DISTCLIP_WATCHDOG_RUN (--run) must be a name of letters"),
    ("", ".hidden", "DISTCLIP_WATCHDOG_RUN (--run) must be a name of letters"),
])
def test_an_unsafe_parent_or_name_is_refused(tmp_path, parent, run, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(WatchdogError) as e:
        make_folder(str(tmp_path / parent), run)
    assert message.format(p=tmp_path) in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["file", "open"]


def test_main_reports_a_refusal_naming_the_path(tmp_path, monkeypatch, capsys):
    from distclip.cluster.watchdog import main

    (tmp_path / ".distclip-watchdog-r").mkdir(mode=0o755)
    assert main(["--dir", str(tmp_path), "--run", "r", "--", "true"]) == 2
    assert f"distclip.cluster.watchdog (rank 0): refusing the watchdog's folder {tmp_path}/.distclip-watchdog-r" in capsys.readouterr().err
