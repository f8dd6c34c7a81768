"""distclip.train.plots and `distclip plot`: a run's metrics.csv drawn as a PNG (the example application)."""
import math
import os

from distclip._src.steplog import StepLog
from distclip.train import cli


def test_distclip_plot_draws_a_log_with_and_without_a_threshold(tmp_path):
    for name, threshold in (("clipped", 1.0), ("unclipped", math.inf)):
        log = StepLog(str(tmp_path / name))
        for step in range(50):
            norm = 0.5 + (step % 7)
            log.write(dict(step=step, loss=1.0 / (step + 1), global_norm=norm, scale=min(1.0, threshold / norm),
                           clip_norm=threshold, clipped=int(norm > threshold), skipped=int(step == 9)))
        log.close()
        assert cli.main(["plot", str(tmp_path / name)]) == 0
        assert os.path.getsize(tmp_path / name / "plot.png") > 10_000
    assert cli.main(["plot", str(tmp_path / "clipped" / "tensorboard")]) == 2  # no metrics.csv there
