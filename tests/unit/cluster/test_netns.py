"""distclip.cluster.netns: what it starts sees a loopback interface and nothing else (real launches: scenarios)."""
import subprocess
import sys


def test_the_command_runs_in_a_network_namespace_with_loopback_only():
    r = subprocess.run([sys.executable, "-m", "distclip.cluster.netns", "cat", "/proc/net/dev"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    interfaces = sorted(line.split(":")[0].strip() for line in r.stdout.splitlines()[2:])
    if "could not create a private network namespace" in r.stderr:  # a kernel without unprivileged namespaces
        assert "unauthenticated" in r.stderr
    else:
        assert interfaces == ["lo"], interfaces
    host = subprocess.run(["cat", "/proc/net/dev"], capture_output=True, text=True).stdout
    assert len(host.splitlines()) - 2 > len(interfaces), "the host itself has more than loopback (else: no test)"
