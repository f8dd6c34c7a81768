"""distclip.ClipReporter in a custom loop: its rows are what the step returned (ClipResult, the oracle read in
the traced step itself), its events name the replica and variables, and the rewind limit saves the last good state."""
import csv

import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import GLOBAL_BATCH, global_batch, make_model, make_optimizer, shard


def _loop(strategy, clip_norm=1.0, **options):
    with strategy.scope():
        model, optimizer = make_model(), make_optimizer("adam")
        clip = distclip.ClipStep(optimizer, clip_norm, **options)
        clip.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
            r = clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables,
                           loss=loss if {"rewind", "skip_spikes"} & set(options) else None)
            return loss, r.global_norm, r.scale, r.group_norms, r.group_scales

        loss, *results = strategy.run(replica_fn, args=(x, y))
        first = [strategy.experimental_local_results(r)[0] if r is not None else None for r in results]
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None), *first)

    return model, optimizer, clip, lambda x, y: step(shard(strategy, x), shard(strategy, y))


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_are_the_step_results_and_a_nonfinite_update_is_named(mirrored, tmp_path, capfd):
    model, _, clip, step = _loop(mirrored, variable_norms=True)
    reporter = distclip.ClipReporter(clip, model.trainable_variables, log_dir=str(tmp_path), variable_norms_every=2)
    assert reporter.report() is None  # no update since it started
    returned = []
    for s in range(5):
        x, y = global_batch(s)
        if s == 1:
            x[GLOBAL_BATCH // 2, 0] = np.nan  # the second replica's half only
        loss, norm, scale, _, _ = step(x, y)
        returned.append((float(loss), float(norm), float(scale)))
        row = reporter.report(loss=loss)
        assert row == reporter.rows[-1]
        assert reporter.report() is None  # nothing new: no row, no event
    reporter.close()
    names = [v.path for v in model.trainable_variables]
    rows = _csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["action"] for r in rows] == ["applied", "nonfinite", "applied", "applied", "applied"]
    for r, (loss, norm, scale) in zip(rows, returned, strict=True):
        if r["action"] == "applied":
            assert (float(r["loss"]), float(r["global_norm"]), float(r["scale"])) == (loss, norm, scale)
            assert r["clipped"] == str(int(norm > 1.0)) and r["clip_norm"] == "1.0"
    assert reporter.clipped_steps == sum(int(r["clipped"]) for r in rows)
    [record] = reporter.nonfinite
    assert (record.step, record.skipped, record.variables) == (1, True, names)
    assert [(p.replica, p.worker, p.device) for p in record.replicas] == [(1, 0, "CPU:1")]
    assert f"distclip: {record.line()}" in capfd.readouterr().err
    assert [(r["step"], r["replica"], r["device"]) for r in _csv(tmp_path / "nonfinite.csv")] == [("1", "1", "CPU:1")]
    layers = _csv(tmp_path / "layer_norms.csv")
    assert sorted({int(r["step"]) for r in layers}) == [0, 2, 4]
    at_4 = [float(r["norm"]) for r in layers if r["step"] == "4"]
    assert np.sqrt(sum(n ** 2 for n in at_4)) == pytest.approx(returned[4][1], rel=1e-5)


def test_accumulating_calls_report_nothing_and_the_limit_saves_the_last_good_state(tmp_path, capfd):
    strategy = tf.distribute.get_strategy()
    model, _, clip, step = _loop(strategy, accumulation_steps=2)
    reporter = distclip.ClipReporter(clip, model.trainable_variables, first_step=7)
    got = []
    for s in range(4):
        step(*global_batch(s))
        got.append(reporter.report())
    assert [r is None for r in got] == [True, False, True, False] and [r["step"] for r in got if r] == [7, 8]
    assert reporter.rows is None  # no log_dir: nothing written

    rewind = distclip.Rewind(every=3, keep=1, skip=0, factor=4.0, window=3, max_rewinds=1, max_rewinds_per=100)
    model, optimizer, clip, step = _loop(strategy, rewind=rewind)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, clip=clip)
    reporter = distclip.ClipReporter(clip, model.trainable_variables, log_dir=str(tmp_path), last_good=checkpoint)
    path = str(tmp_path / "last_good" / "ckpt")
    actions = []
    with pytest.raises(distclip.RewindLimitError, match=f"update 10 would be rewind 2 .* saved to {path}"):
        for s in range(14):
            x, y = global_batch(s)
            step(x, y * 100.0 if s in (6, 9) else y)
            actions.append(reporter.report()["action"])
    assert actions == ["applied"] * 6 + ["rewound"] + ["applied"] * 2
    assert reporter.rewinds == [distclip.RewindEvent(7, 4, 7, False), distclip.RewindEvent(10, 4, 10, True)]
    assert f"distclip: {reporter.rewinds[1].line()}" in capfd.readouterr().err
    assert [r["action"] for r in reporter.rows][-1] == "stopped"
    fresh = make_model(seed=2)
    tf.train.Checkpoint(model=fresh).read(path).expect_partial()
    for got, want in zip(fresh.get_weights(), model.get_weights(), strict=True):  # the last good snapshot
        np.testing.assert_array_equal(got, want)


def test_a_skipped_spike_is_a_row_and_a_line(tmp_path, capfd):
    skip_spikes = distclip.SkipSpikes(factor=4.0, zscore=None, window=3)
    model, _, clip, step = _loop(tf.distribute.get_strategy(), skip_spikes=skip_spikes)
    reporter = distclip.ClipReporter(clip, model.trainable_variables, log_dir=str(tmp_path))
    returned = []
    for s in range(8):
        x, y = global_batch(s)
        returned.append([float(v) for v in step(x, y * 100.0 if s == 6 else y)[:3]])
        reporter.report(loss=returned[-1][0])
    reporter.close()
    rows = _csv(tmp_path / "metrics.csv")
    assert [r["action"] for r in rows] == ["applied"] * 6 + ["spike_skipped", "applied"]
    loss, norm, _ = returned[6]
    assert rows[6]["skipped"] == "1" and (float(rows[6]["global_norm"]), float(rows[6]["loss"])) == (norm, loss)
    assert f"distclip: step 6 skipped: a spike (global norm {norm:.6g}, loss {loss:.6g}); 1 skipped so far" in \
        capfd.readouterr().err
    assert int(clip.skipped_spikes.numpy()) == 1 and reporter.rewinds == []


def test_each_groups_norm_and_scale_is_a_row_per_update(tmp_path):
    groups = distclip.ClipGroups([distclip.VariableGroup("biases", 0.05, patterns=[".*bias"])], default=None)
    model, _, clip, step = _loop(tf.distribute.get_strategy(), groups)
    reporter = distclip.ClipReporter(clip, model.trainable_variables, log_dir=str(tmp_path))
    returned = []
    for s in range(3):
        loss, norm, _, norms, scales = step(*global_batch(s))
        returned.append((norm.numpy(), norms.numpy(), scales.numpy()))
        reporter.report(loss=loss)
    reporter.close()
    rows = _csv(tmp_path / "group_norms.csv")
    assert [(r["step"], r["group"], float(r["clip_norm"])) for r in rows] == \
        [(str(s), g, pytest.approx(c)) for s in range(3) for g, c in (("biases", 0.05), ("default", np.inf))]
    for s, (norm, norms, scales) in enumerate(returned):
        assert [float(r["norm"]) for r in rows if r["step"] == str(s)] == norms.tolist()
        assert [float(r["scale"]) for r in rows if r["step"] == str(s)] == scales.tolist()
        # Clipped: the biases by their own threshold, and by nothing else.
        assert norms[0] > 0.05 and scales[0] < 1 and scales[1] == 1
        assert norm == pytest.approx(np.hypot(0.05, norms[1]), rel=1e-6)
    assert [r["clipped"] for r in _csv(tmp_path / "metrics.csv")] == ["1", "1", "1"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(step="clip"), distclip.ArgumentError, "step must be a distclip.ClipStep .* got step='clip'"),
    (dict(first_step=-1), distclip.ArgumentError, "first_step must be an integer from 0 .* got first_step=-1"),
    (dict(variable_norms_every=2), distclip.ArgumentError, "variable_norms_every=2 writes to a log_dir"),
    (dict(variable_norms_every=2, log_dir="x"), distclip.ContextError, "needs a step made with variable_norms=True"),
    (dict(last_good=5), distclip.ArgumentError, "last_good must be a tf.train.Checkpoint.* got last_good=5"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    model = make_model()
    clip = distclip.ClipStep(make_optimizer("sgd"), 1.0)
    kwargs = {"step": clip, **kwargs}
    with pytest.raises(error, match=match):
        distclip.ClipReporter(kwargs.pop("step"), model.trainable_variables, **kwargs)
    reporter = distclip.ClipReporter(clip, model.trainable_variables)
    with pytest.raises(distclip.ArgumentError, match="loss must be a scalar"):
        reporter.report(loss=tf.constant([1.0, 2.0]))
