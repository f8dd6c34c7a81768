"""distclip.cluster.launcher: TF_CONFIG per worker, exit statuses, signal forwarding, timeout. Tiny Python workers, no TF."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from procs import ROOT


LAUNCHER = [sys.executable, "-m", "distclip.cluster.launcher"]


def test_each_worker_gets_its_tf_config(tmp_path):
    code = ("import json, os, sys; c = json.loads(os.environ['TF_CONFIG']); "
            f"open(os.path.join({str(tmp_path)!r}, str(c['task']['index'])), 'w').write(json.dumps(c))")
    r = subprocess.run(LAUNCHER + ["--nproc", "3", "--", sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0
    configs = [json.loads((tmp_path / str(i)).read_text()) for i in range(3)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("localhost:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"]["worker"] == workers for c in configs)


def test_a_failing_worker_stops_the_others():
    code = ("import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
            "time.sleep(0.5) if i == 1 else time.sleep(300); sys.exit(7)")
    start = time.monotonic()
    r = subprocess.run(LAUNCHER + ["--nproc", "2", "--grace", "2", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7
    assert "worker 1 (pid" in r.stderr and "exited with status 7; stopping the other 1 worker(s)" in r.stderr
    assert time.monotonic() - start < 20


def test_signals_are_forwarded_and_timeout_bounds_the_run(tmp_path):
    code = ("import signal, sys, time, os; "
            f"signal.signal(signal.SIGTERM, lambda *a: (open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w'), sys.exit(3))); "
            "time.sleep(300)")
    p = subprocess.Popen(LAUNCHER + ["--nproc", "2", "--", sys.executable, "-c", code],
                         stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) != 0
    assert len(os.listdir(tmp_path)) == 2, "both workers received SIGTERM"

    r = subprocess.run(LAUNCHER + ["--nproc", "2", "--timeout", "2", "--grace", "1", "--", sys.executable, "-c",
                                   "import time; time.sleep(300)"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 124 and "--timeout 2 s reached" in r.stderr


# Workers that ignore SIGTERM, as a TensorFlow worker blocked in a collective effectively does.
_STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); "
_RANK = "import json, os; rank = json.loads(os.environ['TF_CONFIG'])['task']['index']; "


def _launch(args, code, **kwargs):
    start = time.monotonic()
    r = subprocess.run(LAUNCHER + args + ["--", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=90, **kwargs)
    return r, time.monotonic() - start


@pytest.mark.parametrize("worker_1, message", [
    ("rank == 1 or time.sleep(300)", "exited with status 0 while 1 other worker(s) still ran for 2 s"),
    ("rank == 1 and os.kill(os.getpid(), signal.SIGSTOP); time.sleep(300)", "is stopped (SIGSTOP) and does not answer"),
], ids=["exits early with status 0", "stopped"])
def test_a_worker_the_others_would_wait_for_forever_ends_the_run(worker_1, message):
    r, took = _launch(["--nproc", "2", "--exit-wait", "2", "--grace", "1"], _STUBBORN + _RANK + worker_1)
    assert r.returncode == 1, r.stderr
    assert "worker 1 (pid" in r.stderr and message in r.stderr
    assert took < 30


def test_sigterm_escalates_to_sigkill_after_the_grace_period():
    p = subprocess.Popen(LAUNCHER + ["--nproc", "2", "--grace", "2", "--", sys.executable, "-c",
                                     _STUBBORN + "time.sleep(300)"], stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 15
    assert "workers still running 2 s after SIGTERM: killing them" in p.stderr.read()


def test_a_worker_that_cannot_start_is_named():
    r = subprocess.run(LAUNCHER + ["--nproc", "2", "--", "/nonexistent/python"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 127 and "worker 0 could not start" in r.stderr


def _listeners(ports, netns_of="self"):
    """(address, port) of TCP sockets listening on `ports`, from /proc/<netns_of>/net/tcp{,6}."""
    found = []
    for name in ("tcp", "tcp6"):
        with open(f"/proc/{netns_of}/net/{name}") as f:
            for line in f.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port = local.split(":")
                if state == "0A" and int(port, 16) in ports:
                    found.append((address, int(port, 16)))
    return found


_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net shows them


@pytest.mark.parametrize("host_network", [False, True], ids=["default", "--host-network"])
def test_workers_listen_on_loopback_only(tmp_path, host_network):
    """Workers that listen as TensorFlow's gRPC server does (every interface, on their TF_CONFIG port):
    by default the machine sees no listener at all, and the workers see loopback only."""
    code = ("import json, os, socket, time; c = json.loads(os.environ['TF_CONFIG']); i = c['task']['index']; "
            "port = int(c['cluster']['worker'][i].split(':')[1]); s = socket.socket(socket.AF_INET6); "
            "s.bind(('::', port)); s.listen(); "
            "nics = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]; "
            f"open(os.path.join({str(tmp_path)!r}, str(i)), 'w').write(json.dumps([port, os.getpid(), nics])); "
            f"[time.sleep(0.1) for _ in range(600) if not os.path.exists(os.path.join({str(tmp_path)!r}, 'go'))]")
    p = subprocess.Popen(LAUNCHER + ["--nproc", "2"] + (["--host-network"] if host_network else []) +
                         ["--", sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / str(i)).exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [json.loads((tmp_path / str(i)).read_text()) for i in range(2)]
        ports = {port for port, _, _ in workers}
        seen_here = _listeners(ports)
        if host_network:  # the check sees what TensorFlow's wildcard bind exposes
            assert seen_here and any(address not in _LOOPBACK for address, _ in seen_here)
        else:
            assert seen_here == [], f"listeners visible on this machine's interfaces: {seen_here}"
            for _, pid, nics in workers:
                assert nics == ["lo"], nics
                assert {port for _, port in _listeners(ports, netns_of=pid)} == ports
    finally:
        (tmp_path / "go").write_text("")
        assert p.wait(timeout=30) == 0, p.stderr.read()


def _exposed_listeners(root_pid):
    """TCP listeners on a non-loopback address, in this machine's network namespace, owned by
    `root_pid` or any process under it (matched by socket inode)."""
    import psutil

    inodes = set()
    procs = [psutil.Process(root_pid)] + psutil.Process(root_pid).children(recursive=True)
    for proc in procs:
        try:
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for name in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{name}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                address = fields[1].split(":")[0]
                if fields[3] == "0A" and fields[9] in inodes and address not in _LOOPBACK:
                    found.append(fields[1])
    return found


@pytest.mark.parametrize("script, env, exposed", [
    ("horovodrun.sh", {}, False),
    ("mpirun.sh", {}, False),
    ("horovodrun.sh", {"HOSTS": "localhost:2"}, True),  # named hosts: the host network, as for several machines
], ids=["horovodrun.sh", "mpirun.sh", "horovodrun.sh with HOSTS"])
def test_local_horovod_runs_listen_on_loopback_only(tmp_path, script, env, exposed):
    """While both ranks of a local run wait, nothing of the run listens on this machine's interfaces."""
    import horovod  # noqa: F401  (the launch scripts need it installed)

    code = ("import os, time; r = os.environ.get('HOROVOD_RANK') or os.environ['OMPI_COMM_WORLD_RANK']; "
            f"open(os.path.join({str(tmp_path)!r}, r), 'w').write(''); "
            f"[time.sleep(0.1) for _ in range(600) if not os.path.exists(os.path.join({str(tmp_path)!r}, 'go'))]")
    script_path = os.path.join(ROOT, "launch", script)
    p = subprocess.Popen(["bash", script_path, sys.executable, "-c", code], env=dict(os.environ, NP="2", **env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / r).exists() for r in "01") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all((tmp_path / r).exists() for r in "01"), "the ranks never started"
        listeners = _exposed_listeners(p.pid)
        assert bool(listeners) == exposed, listeners
    finally:
        (tmp_path / "go").write_text("")
        try:
            out, _ = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out[-3000:]
