"""A private network namespace for local runs: the processes started in it see only loopback.

TensorFlow's gRPC server listens on every interface ("0.0.0.0:port", fixed in
its C++ code), and so do Horovod's rendezvous server and Gloo; none of them
authenticates. A run on one machine needs loopback only, so the local launch
paths start their processes in a new network namespace that holds nothing
else: `distclip.cluster.launcher` for MultiWorkerMirroredStrategy, and

    python -m distclip.cluster.netns COMMAND [ARGS...]

for anything else (`launch/horovodrun.sh` and `launch/mpirun.sh` use it when
no other host is named). Inside, nothing can reach other machines either.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys
from typing import List, Optional

_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def private_network() -> Optional[str]:
    """Moves this process, and every worker it starts afterwards, into a new network namespace that
    holds only a loopback interface. Returns None, or why it could not (the workers then share the host's).

    TensorFlow's gRPC server listens on every interface ("0.0.0.0:port", fixed in its C++ code) and
    is unauthenticated; a local run needs loopback only. As root this is unshare(CLONE_NEWNET);
    otherwise a user namespace is created first (where the kernel allows unprivileged ones).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWNET) != 0:
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            if code == errno.ENOSPC:  # the kernel's answer when user.max_user_namespaces is 0 or used up
                return ("the kernel allows this user no more user namespaces: sysctl user.max_user_namespaces "
                        "is 0 or used up")
            if code == errno.EPERM:
                return ("the kernel does not let unprivileged users create user namespaces "
                        "(kernel.unprivileged_userns_clone, or a security policy such as AppArmor's)")
            return os.strerror(code)
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new namespace's loopback starts down
        flags = struct.unpack("16sh", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))
    return None


def isolate(who: str) -> None:
    """`private_network()`, saying on stderr, as `who`, when it could not be made (the run goes on exposed)."""
    why = private_network()
    if why:
        print(f"{who}: could not create a private network namespace ({why}); what it starts runs on this "
              "machine's network, where TensorFlow's, Horovod's and MPI's servers listen on every interface, "
              "unauthenticated (see the README's Security section)", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    isolate("distclip.cluster.netns")
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
