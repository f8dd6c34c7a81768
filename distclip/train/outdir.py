"""The output folder of `distclip train`: held exclusively while a run lives, never clobbered by a new run.

A run takes a POSIX record lock (`fcntl.lockf`) on `OUT/.distclip.lock` before
it writes anything, and holds it until the process ends. The kernel drops the
lock with the process, so a run killed by SIGKILL never leaves a stale lock
(the empty file stays; it is not the lock). A second run on the same folder
is refused at once, naming the folder and the holder's process id (read with
`F_GETLK`, so nothing is written into the file).

A run without `--resume` is refused in a folder that holds another run's
outputs (`OUTPUTS`), before it writes anything; `--move-aside` moves them,
unchanged, into `OUT/aside-N/` (the first free N) instead.

Under several processes only the chief calls this (see `distclip.train.cli`):
the other ranks write nothing into OUT.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import List, Optional

LOCK = ".distclip.lock"
#: What a run of `distclip train` writes into OUT (`ClipLogger(log_dir)` writes the same files).
OUTPUTS = ("checkpoints", "metrics.csv", "nonfinite.csv", "layer_norms.csv", "rewinds.csv", "tensorboard",
           "plot.png", "summary.json", "last_good")


class OutputFolderError(RuntimeError):
    """The output folder is held by another run, or holds another run's outputs and `--resume` was not given."""


def _holder(fd: int) -> Optional[int]:
    """The process id holding a conflicting lock on `fd`'s file (Linux `struct flock`), or None."""
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


class OutputFolder:
    """Holds `out` for the life of this process (or until `release`)."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Takes the lock, creating `out` if needed.

        Raises:
          OutputFolderError: another process holds it (named with its process id).
        """
        os.makedirs(self.out, exist_ok=True)
        fd = os.open(os.path.join(self.out, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            pid = _holder(fd)
            os.close(fd)
            raise OutputFolderError(
                f"--out {self.out} is in use by another distclip train run"
                + (f" (process {pid})" if pid else "")
                + "; wait for it to end, or give another --out") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def outputs(self) -> List[str]:
        """The names in `out` that another run wrote (of `OUTPUTS`), sorted."""
        return sorted(n for n in OUTPUTS if os.path.lexists(os.path.join(self.out, n)))

    def check_new_run(self, move_aside: bool) -> Optional[str]:
        """For a run without `--resume`: refuses a folder with outputs, or moves them aside; returns where to.

        Raises:
          OutputFolderError: `out` holds another run's outputs and `move_aside` is False (nothing is changed).
        """
        found = self.outputs()
        if not found:
            return None
        if not move_aside:
            raise OutputFolderError(
                f"--out {self.out} holds another run's outputs ({', '.join(found)}). Continue that run with "
                "--resume, give another --out, or pass --move-aside to move them into "
                f"{os.path.join(self.out, 'aside-N')}/ (nothing is deleted)")
        n = 1
        while os.path.lexists(os.path.join(self.out, f"aside-{n}")):
            n += 1
        aside = os.path.join(self.out, f"aside-{n}")
        os.mkdir(aside)
        for name in found:
            os.replace(os.path.join(self.out, name), os.path.join(aside, name))
        return aside
