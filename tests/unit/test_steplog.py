"""distclip._src.steplog: the per-step CSV and TensorBoard log that ClipLogger and `distclip train` share."""
import math
import os

from common import read_tensorboard
from distclip._src.steplog import COLUMNS, StepLog
from distclip.train.plots import read_csv


def _row(step, clip_norm=1.0):
    return dict(step=step, loss=0.5 / (step + 1), global_norm=2.0 + step, scale=1.0 / (2.0 + step), clip_norm=clip_norm,
                clipped=1, skipped=0)


def test_rows_go_to_the_csv_and_tensorboard_and_a_resume_keeps_only_the_earlier_ones(tmp_path):
    log = StepLog(str(tmp_path))
    for step in range(5):
        log.write(_row(step, clip_norm=math.inf if step == 4 else 1.0))
    log.close()
    rows = read_csv(os.path.join(tmp_path, "metrics.csv"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and list(rows[0]) == list(COLUMNS)
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
