"""distclip.train.outdir: a run holds its output folder exclusively and never clobbers another run's outputs.

The lock is a real POSIX record lock, held by another real process (a POSIX lock is per process: the test
process cannot contend with itself). The whole command is run in tests/scenarios/test_cli.py."""
import os
import subprocess
import sys

import pytest

from distclip.train.outdir import LOCK, OutputFolder, OutputFolderError

HOLD = """
import sys, time
from distclip.train.outdir import OutputFolder
OutputFolder(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin, or kills us
"""


def test_a_second_process_is_refused_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputFolderError, match=f"--out {out} is in use by another distclip train run "
                                                    rf"\(process {holder.pid}\)"):
            OutputFolder(out).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # SIGKILLed: the kernel dropped the lock; the empty file it leaves blocks nothing.
    assert os.path.getsize(os.path.join(out, LOCK)) == 0
    folder = OutputFolder(out)
    folder.acquire()
    folder.release()


def test_a_new_run_is_refused_in_a_folder_with_outputs_or_moves_them_aside_unchanged(tmp_path):
    out = tmp_path / "run"
    folder = OutputFolder(str(out))
    folder.acquire()
    try:
        assert folder.check_new_run(move_aside=False) is None  # empty: nothing to refuse
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "ckpt-3.index").write_bytes(b"\x01\x02")
        (out / "metrics.csv").write_text("step\n0\n")
        (out / "notes.txt").write_text("the user's own")
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        with pytest.raises(OutputFolderError, match=f"--out {out} holds another run's outputs \\(checkpoints, "
                                                    "metrics.csv\\). Continue that run with --resume"):
            folder.check_new_run(move_aside=False)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert folder.check_new_run(move_aside=True) == str(out / "aside-1")
        assert sorted(os.listdir(out)) == [LOCK, "aside-1", "notes.txt"]
        assert (out / "aside-1" / "checkpoints" / "ckpt-3.index").read_bytes() == b"\x01\x02"
        assert (out / "aside-1" / "metrics.csv").read_text() == "step\n0\n"
        (out / "summary.json").write_text("{}")
        assert folder.check_new_run(move_aside=True) == str(out / "aside-2")  # never into an earlier aside
    finally:
        folder.release()
