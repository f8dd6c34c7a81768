"""distclip._src.steplog: the per-step CSV and TensorBoard log that ClipLogger and `distclip train` share."""
import math
import os

from common import read_tensorboard
from distclip import RewindEvent
from distclip import NonfiniteUpdate, ReplicaPlace
from distclip._src.steplog import COLUMNS, StepLog
from distclip.train.plots import read_csv


def _row(step, clip_norm=1.0):
    return dict(step=step, loss=0.5 / (step + 1), global_norm=2.0 + step, scale=1.0 / (2.0 + step), clip_norm=clip_norm,
                clipped=1, skipped=0, action="applied")


def test_rows_go_to_the_csv_and_tensorboard_and_a_resume_keeps_only_the_earlier_ones(tmp_path):
    log = StepLog(str(tmp_path))
    for step in range(5):
        log.write(_row(step, clip_norm=math.inf if step == 4 else 1.0))
    log.close()
    rows = read_csv(os.path.join(tmp_path, "metrics.csv"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and list(rows[0]) == list(COLUMNS[:-1])  # the action, a name, is not read
    assert rows[2]["global_norm"] == 4.0 and rows[4]["clip_norm"] == math.inf  # clip_norm=None: inf
    board = read_tensorboard(os.path.join(tmp_path, "tensorboard"))
    assert board["global_norm"] == [(s, 2.0 + s) for s in range(5)]
    assert board["clip_norm"] == [(s, 1.0) for s in range(4)]  # inf (no clipping) is left out
    assert sorted(board) == ["clip_norm", "global_norm", "loss", "scale", "skipped"]
    with open(os.path.join(tmp_path, "metrics.csv"), "a") as f:
        f.write("5,0.1,2")  # a line cut short by a kill
    resumed = StepLog(str(tmp_path), first_step=3)  # the checkpoint was taken after 3 steps
    assert [r["step"] for r in resumed.rows] == [0, 1, 2]
    # Already on disk, before anything is flushed or closed: a SIGKILL now loses none of the kept rows.
    assert [r["step"] for r in read_csv(os.path.join(tmp_path, "metrics.csv"))] == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "tensorboard"]
    resumed.write(_row(3))
    resumed.close()
    assert [r["step"] for r in read_csv(os.path.join(tmp_path, "metrics.csv"))] == [0, 1, 2, 3]


def test_a_resume_reads_the_earlier_events_back_and_keeps_a_0_2_0_log_with_its_actions(tmp_path):
    """A run's summary after --resume lists the earlier run's non-finite steps and rewinds: they come back from
    the kept rows of nonfinite.csv and rewinds.csv exactly as written. A stopped rewind's row says "stopped"
    where a skip_through_step would mean nothing. metrics.csv rows of distclip 0.2.0 (no action) are kept,
    with the action their `skipped` meant."""
    log = StepLog(str(tmp_path))
    places = [ReplicaPlace(1, 0, "node-3", "CPU:1"), ReplicaPlace(0, 0, "node-3", "CPU:0")]
    events = [NonfiniteUpdate(2, True, places, ["dense/kernel", "dense/bias"]), NonfiniteUpdate(4, False, [], [])]
    rewinds = [RewindEvent(at=4, to=2, skip_through=6, stopped=False), RewindEvent(at=8, to=7, skip_through=8,
                                                                                   stopped=True)]
    for e in events:
        log.write_nonfinite(e)
    for r in rewinds:
        log.write_rewind(r)
    log.close()
    with open(os.path.join(tmp_path, "rewinds.csv")) as f:
        assert f.read().splitlines()[1:] == ["3,1,5,0", "7,6,stopped,1"]
    resumed = StepLog(str(tmp_path), first_step=8)
    assert resumed.earlier_nonfinite() == events and resumed.earlier_rewinds() == rewinds
    resumed.close()
    assert StepLog(str(tmp_path), first_step=4).earlier_rewinds() == rewinds[:1]

    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.csv").write_text("step,loss,global_norm,scale,clip_norm,clipped,skipped\n"
                                     "0,0.5,2.0,0.5,1.0,1,0\n1,nan,nan,0.0,1.0,0,1\n2,0.4,0.5,1.0,1.0,0,0\n")
    resumed = StepLog(str(old), first_step=2)
    assert [r["action"] for r in resumed.rows] == ["applied", "nonfinite"]
    resumed.close()
    assert (old / "metrics.csv").read_text().splitlines() == [
        ",".join(COLUMNS), "0,0.5,2.0,0.5,1.0,1,0,applied", "1,nan,nan,0.0,1.0,0,1,nonfinite"]
