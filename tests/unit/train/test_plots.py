"""distclip.train.plots and `distclip plot`: a run's metrics.csv drawn as a PNG (the example application)."""
import math
import os

from distclip import RewindEvent
from distclip._src.steplog import StepLog
from distclip.train.plots import read_rewinds
from distclip.train import cli


def test_distclip_plot_draws_a_log_with_and_without_a_threshold(tmp_path):
    for name, threshold in (("clipped", 1.0), ("unclipped", math.inf)):
        log = StepLog(str(tmp_path / name))
        for step in range(50):
            norm = 0.5 + (step % 7)
            log.write(dict(step=step, loss=1.0 / (step + 1), global_norm=norm, scale=min(1.0, threshold / norm),
                           clip_norm=threshold, clipped=int(norm > threshold and step != 9), skipped=int(step == 9),
                           action="nonfinite" if step == 9 else "applied"))
        # A rewind, and one over the limit (its rewinds.csv row says "stopped": drawn up to its spike).
        log.write_rewind(RewindEvent(at=21, to=11, skip_through=24, stopped=False))
        log.write_rewind(RewindEvent(at=41, to=31, skip_through=41, stopped=True))
        log.close()
        assert read_rewinds(str(tmp_path / name)) == [(20.0, 10.0, 23.0), (40.0, 30.0, 40.0)]
        assert cli.main(["plot", str(tmp_path / name)]) == 0
        assert os.path.getsize(tmp_path / name / "plot.png") > 10_000
    assert cli.main(["plot", str(tmp_path / "clipped" / "tensorboard")]) == 2  # no metrics.csv there


def test_distclip_plot_draws_the_largest_layers(tmp_path):
    from distclip.train.plots import largest_layers, read_layers

    log = StepLog(str(tmp_path))
    names = [f"layer_{i}/kernel" for i in range(7)] + [f"layer_{i}/bias" for i in range(7)]
    for step in range(30):
        norm = 1.0 + step % 3
        log.write(dict(step=step, loss=1.0, global_norm=norm, scale=1.0, clip_norm=10.0, clipped=0, skipped=0,
                       action="applied"))
        if step % 5 == 0:
            log.write_norms(step, names, [float(i) for i in range(7)] + [1.0] * 7)
    log.close()
    layers = read_layers(str(tmp_path))
    assert sorted(layers) == [f"layer_{i}" for i in range(7)]
    assert [s for s, _ in layers["layer_6"]] == [0, 5, 10, 15, 20, 25]
    assert layers["layer_6"][0][1] == math.sqrt(36.0 + 1.0)  # kernel and bias make the layer's norm
    assert largest_layers(layers) == [f"layer_{i}" for i in (6, 5, 4, 3, 2)]
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert os.path.getsize(tmp_path / "plot.png") > 10_000
    assert read_layers(str(tmp_path / "tensorboard")) is None
