"""distclip._src.keras.callbacks: ClipLogger and BroadcastCallback."""

import keras
import pytest

import distclip
from common import GLOBAL_BATCH, make_model
from fitting import data


def test_clip_logger_needs_a_clip_optimizer():
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(1)
    with pytest.raises(distclip.ContextError, match="ClipOptimizer"):
        model.fit(x, y, batch_size=GLOBAL_BATCH, verbose=0, callbacks=[distclip.keras.ClipLogger()])


def test_clip_logger_names_the_replica_writes_layer_norms_and_the_noise_scale(mirrored, tmp_path, capfd):
    import csv

    import numpy as np

    from common import read_tensorboard

    x, y = data(4)
    x[GLOBAL_BATCH + GLOBAL_BATCH // 2, 0] = np.nan  # step 1, the second replica's half only
    with mirrored.scope():
        model = make_model()
        optimizer = distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), 0.3, variable_norms=True,
                                                 noise_scale=distclip.NoiseScale(GLOBAL_BATCH))
        model.compile(optimizer=optimizer, loss="mse")
    logger = distclip.keras.ClipLogger(str(tmp_path), variable_norms_every=2)
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0, callbacks=[logger])
    names = [v.path for v in model.trainable_variables]
    assert len(logger.nonfinite) == 1
    record = logger.nonfinite[0]
    assert record.step == 1 and record.skipped
    assert [(p.replica, p.worker, p.device) for p in record.replicas] == [(1, 0, "CPU:1")]
    assert record.variables == names  # NaN in an input reaches every gradient
    line = f"step 1 skipped: non-finite gradients from replica 1 (worker 0, host {record.replicas[0].host}, CPU:1)"
    assert line in capfd.readouterr().err
    with open(tmp_path / "nonfinite.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["replica"], r["device"], r["variables"]) for r in rows] == [
        ("1", "1", "CPU:1", ";".join(names))]
    # Per-layer norms every 2nd update (steps 0 and 2), equal to the norms the optimizer kept of its variables.
    with open(tmp_path / "layer_norms.csv", newline="") as f:
        layers = list(csv.DictReader(f))
    layer_names = sorted({n.rsplit("/", 1)[0] for n in names})
    assert sorted({r["layer"] for r in layers}) == layer_names
    assert sorted({int(r["step"]) for r in layers}) == [0, 2]
    last = {r["layer"]: float(r["norm"]) for r in layers if r["step"] == "2"}
    norms = optimizer.variable_norms.numpy()
    # Step 3 overwrote the variable; recompute step 2's from metrics.csv's global norm instead: layers sum to it.
    with open(tmp_path / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    assert np.sqrt(sum(v ** 2 for v in last.values())) == pytest.approx(float(metrics[2]["global_norm"]), rel=1e-5)
    assert [(r["action"], r["skipped"], r["clipped"]) for r in metrics][1] == ("nonfinite", "1", "0")
    assert {r["action"] for i, r in enumerate(metrics) if i != 1} == {"applied"}
    assert norms.shape == (len(names),)
    logger_tb = read_tensorboard(str(tmp_path / "tensorboard"))
    assert {f"layer_norm/{n}" for n in layer_names} <= set(logger_tb)
    assert {"noise/gradient_squared", "noise/trace", "noise/b_simple"} <= set(logger_tb)
    assert "b_simple" in history.history


def test_clip_logger_refuses_a_noise_scale_batch_that_is_not_the_batch_fit_feeds(mirrored):
    """NoiseScale's global_batch_size is checked against the examples fit's loss tracker counted (over both
    replicas) at the first batch, before a second update."""
    x, y = data(3)
    with mirrored.scope():
        model = make_model()
        optimizer = distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.05), 1.0,
                                                 noise_scale=distclip.NoiseScale(2 * GLOBAL_BATCH))
        model.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(distclip.ArgumentError, match=rf"NoiseScale\(global_batch_size={2 * GLOBAL_BATCH}\) does not "
                                                     rf"match the data fit measures: {GLOBAL_BATCH} examples per update"):
        model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0, callbacks=[distclip.keras.ClipLogger()])
    assert int(optimizer.iterations.numpy()) == 1
