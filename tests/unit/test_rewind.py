"""Rewind on a spike, or skip it: the run equals the run in which the skipped batches' updates never happened.

The oracle is distclip without `rewind`, called on the same batch stream minus the batches a rewind
discarded (the run it must equal, bit for bit), and Keras's own `fit` on that shorter stream.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import GLOBAL_BATCH, global_batch, lr_factor_by_hand, make_model, make_optimizer, replica_values, shard, \
    zero_moments_by_hand
from graphs import collectives, host_round_trips

RW = dict(every=3, keep=2, skip=2, factor=4.0, window=3)
#: The same detector, skipping: batch 9 (update 10) is the spike.
SKIP = dict(factor=4.0, zscore=None, window=3)


def batches(n=16, poison=(9,), scale=100.0, nan=()):
    out = [global_batch(s) for s in range(n)]
    for i in poison:
        out[i] = (out[i][0], out[i][1] * scale)
    for i in nan:
        out[i] = (out[i][0], out[i][1] * np.float32(np.nan))
    return out


def train(strategy, stream, rewind=None, skip=(), loss=True, opt="adam", clip_norm=1.0, mixed=False,
          accumulation=1, objects=None, skip_spikes=None, opt_kwargs=None):
    """ClipStep under `strategy` over `stream`, not calling the step for the batches in `skip`.

    Returns (every variable on every replica: model, optimizer, clip state; the step; the traced step)."""
    if objects is None:
        with strategy.scope():
            model = make_model()
            optimizer = make_optimizer(opt, **(opt_kwargs or {}))
            if mixed:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0 ** 4)
            clip = distclip.ClipStep(optimizer, clip_norm, rewind=rewind, accumulation_steps=accumulation,
                                     skip_spikes=skip_spikes)
            clip.build(model.trainable_variables)
    else:
        model, optimizer, clip = objects

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
                scaled = optimizer.scale_loss(value) if mixed else value
            grads = tape.gradient(scaled, model.trainable_variables)
            return clip.apply(grads, model.trainable_variables, loss=value if loss else None).global_norm
        return strategy.run(replica_fn, args=(x, y))

    for i, (x, y) in enumerate(stream):
        if i not in skip:
            step(shard(strategy, x), shard(strategy, y))
    state = [*model.trainable_variables, *optimizer.variables, *clip.policy_state.values(), clip.skipped_steps]
    return replica_values(strategy, state), (model, optimizer, clip), step


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        for replica in g:  # every replica holds the oracle's value, bit for bit
            np.testing.assert_array_equal(replica, w[0])


def discarded(event, accumulation=1):
    """The batch indices (from 0) whose updates a rewind discarded: updates `to` through `skip_through`."""
    return set(range((event.to - 1) * accumulation, event.skip_through * accumulation))


# The device ring differs from the host ring only in where it lives: `slow`.
@pytest.mark.parametrize("placement", ["host", pytest.param("device", marks=pytest.mark.slow)])
def test_a_rewind_equals_the_run_without_the_discarded_batches(mirrored, placement):
    stream = batches()
    got, (_, _, clip), _ = train(mirrored, stream, distclip.Rewind(**RW, placement=placement))
    ring = clip.rewinding.ring[0]
    if placement == "device":  # one copy per replica, on its device
        assert [v.device[-5:] for v in mirrored.experimental_local_results(ring)] == ["CPU:0", "CPU:1"]
    event = clip.latest_rewind()
    # Snapshots before updates 1, 4, 7; the spike at update 10 goes back to the oldest kept, before update 4.
    assert event == distclip.RewindEvent(at=10, to=4, skip_through=12, stopped=False)
    assert int(clip.rewinds.numpy()) == 1 and int(clip.rewinding.skipped.numpy()) == 3
    want, _, _ = train(mirrored, stream, None, skip=discarded(event))
    assert_same(got, want)


def test_a_skipped_spike_equals_the_run_without_that_batch(mirrored):
    stream = batches()
    got, (_, optimizer, clip), _ = train(mirrored, stream, skip_spikes=distclip.SkipSpikes(**SKIP))
    assert int(clip.skipped_spikes.numpy()) == 1 and clip.latest_rewind() is None and clip.rewinding.ring == []
    assert int(optimizer.iterations.numpy()) == len(stream) - 1  # nothing went back
    want, _, _ = train(mirrored, stream, None, skip={9})
    assert_same(got, want)


AFTER = dict(lr_factor=0.25, lr_updates=3, reset_moments=True)


@pytest.mark.parametrize("opt, after, mixed, accumulation", [
    ("adam", AFTER, False, 1),
    # SGD's momentum, the stepped factor: the same mechanism with another optimizer's slots.
    pytest.param("sgd", dict(lr_factor=0.5, lr_updates=2, lr_ramp="step", reset_moments=True), False, 1,
                 marks=pytest.mark.slow),
    pytest.param("adam", AFTER, True, 2, marks=pytest.mark.slow),
], ids=["adam", "sgd-momentum-step", "mixed-accumulation"])
def test_after_a_rewind_the_learning_rate_and_moments_change_as_made_by_hand(mirrored, opt, after, mixed,
                                                                             accumulation):
    """The oracle: the run without rewind on the batches the rewind kept, with the moment slots set to zero by
    hand where the rewind went back, and the learning rate of the next K applied updates set by hand."""
    kwargs = {"momentum": 0.9} if opt == "sgd" else {}
    k = accumulation
    stream = batches(n=32, poison=(19,)) if k > 1 else batches()
    got, (_, _, clip), _ = train(mirrored, stream, distclip.Rewind(**RW, **after), opt=opt, opt_kwargs=kwargs,
                                 mixed=mixed, accumulation=k)
    event = clip.latest_rewind()
    assert event == distclip.RewindEvent(at=10, to=4, skip_through=12, stopped=False)
    assert int(clip.rewinding.lr_left.numpy()) == max(0, after["lr_updates"] - (len(stream) // k - 12))

    _, (model, optimizer, plain), step = train(mirrored, stream[:(event.to - 1) * k], None, opt=opt,
                                               opt_kwargs=kwargs, mixed=mixed, accumulation=k, loss=False)
    zero_moments_by_hand(optimizer)
    rate = getattr(optimizer, "inner_optimizer", optimizer).learning_rate
    base = np.float32(rate.numpy())
    for j, i in enumerate(range(event.skip_through * k, len(stream), k), start=1):
        rate.assign(base * lr_factor_by_hand(after["lr_factor"], after["lr_updates"], after.get("lr_ramp", "linear"),
                                             j))
        for x, y in stream[i:i + k]:
            step(shard(mirrored, x), shard(mirrored, y))
    rate.assign(base)
    want = replica_values(mirrored, [*model.trainable_variables, *optimizer.variables, *plain.policy_state.values(),
                                     plain.skipped_steps])
    assert_same(got, want)


def test_the_two_sided_rule_skips_a_dip_too_and_a_lasting_shift_only_until_the_window_sees_it():
    """OLMo-core's rule: |x - mean| > zscore * std. Norms 1, 1.2, 0.8, 1.1, then 0.01 and 1: the dip is a spike
    only with `two_sided`; the oracle is the step without skip_spikes, not called for the skipped gradient.
    Then 1, 1.2, 0.8, 1.1 and 10 four times: the first 10 is skipped and enters the window (mean 3.3, std 3.9),
    so the next are not; a window of applied updates only would skip every one after the shift."""
    norms = [1.0, 1.2, 0.8, 1.1, 0.01, 1.0]

    def run(skip_spikes, skip=()):
        variable = tf.Variable(tf.ones([4]))
        step = distclip.ClipStep(keras.optimizers.Adam(0.1), 5.0, skip_spikes=skip_spikes)
        for i, n in enumerate(norms):
            if i not in skip:
                step.apply([tf.constant([n, 0.0, 0.0, 0.0])], [variable])
        return variable.numpy(), step

    for two_sided, skipped in ((True, 1), (False, 0)):
        got, step = run(distclip.SkipSpikes(zscore=3.0, window=4, two_sided=two_sided))
        assert int(step.skipped_spikes.numpy()) == skipped
        want, _ = run(None, skip={4} if skipped else ())
        np.testing.assert_array_equal(got, want)
    norms = [1.0, 1.2, 0.8, 1.1, 10.0, 10.0, 10.0, 10.0]
    got, step = run(distclip.SkipSpikes(zscore=3.0, window=4))
    assert int(step.skipped_spikes.numpy()) == 1
    np.testing.assert_array_equal(got, run(None, skip={4})[0])


def test_a_run_without_spikes_is_unchanged_by_rewind(mirrored):
    stream = batches(n=10, poison=())
    got, (_, _, clip), _ = train(mirrored, stream, distclip.Rewind(**RW))
    want, _, _ = train(mirrored, stream, None)
    assert_same(got, want)
    assert clip.latest_rewind() is None
    assert int(clip.rewinding.ring_size.numpy()) == 2  # it did take snapshots


def test_rewind_adds_no_collective_and_the_loss_one_element(mirrored):
    stream = batches(n=1, poison=())
    counts = {}
    for name, rewind, loss, skip_spikes in (("off", None, False, None), ("on", distclip.Rewind(**RW), False, None),
                                            ("loss", distclip.Rewind(**RW), True, None),
                                            ("skip", None, False, distclip.SkipSpikes(**SKIP))):
        _, _, step = train(mirrored, stream, rewind, loss=loss, skip_spikes=skip_spikes)
        x, y = stream[0]
        graph = step.get_concrete_function(shard(mirrored, x), shard(mirrored, y)).graph
        counts[name] = sorted(n for n, _ in collectives(graph))
    assert counts["on"] == counts["off"] == counts["skip"]
    assert len(counts["loss"]) == len(counts["off"]) and sum(counts["loss"]) == sum(counts["off"]) + 2  # per device


def test_the_ring_is_in_host_memory_and_its_size_is_reported(mirrored):
    _, (model, optimizer, clip), _ = train(mirrored, batches(n=1, poison=()), distclip.Rewind(**RW))
    ring = clip.rewinding.ring
    assert all("CPU:0" in v.device and not isinstance(v, tf.distribute.DistributedValues) for v in ring)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    # Adam: the weights and 2 slots in float32, plus its scalars and distclip's skip count.
    assert clip.rewinding.snapshot_bytes() == 12 * params + 8 + 4 + 8


@pytest.mark.parametrize("answer", ["rewind", pytest.param("skip_spikes", marks=pytest.mark.slow)])
def test_mixed_precision_and_accumulation_rewind_to_the_oracle(mirrored, answer):
    stream = batches(n=24, poison=(19,))
    if answer == "rewind":
        got, (_, optimizer, clip), _ = train(mirrored, stream, distclip.Rewind(**RW), mixed=True, accumulation=2)
        event = clip.latest_rewind()
        assert event is not None and event.at == 10
        skip = discarded(event, 2)
    else:
        got, (_, optimizer, clip), _ = train(mirrored, stream, mixed=True, accumulation=2,
                                             skip_spikes=distclip.SkipSpikes(**SKIP))
        assert int(clip.skipped_spikes.numpy()) == 1
        skip = {18, 19}  # update 10's two micro-batches
    want, _, _ = train(mirrored, stream, None, mixed=True, accumulation=2, skip=skip, loss=False)
    assert_same(got, want)  # the loss scale and its counter included (LossScaleOptimizer.variables)


def test_nonfinite_norms_in_a_row_rewind():
    strategy = tf.distribute.get_strategy()
    rewind = distclip.Rewind(every=2, keep=1, skip=1, factor=None, nonfinite_in_row=2)
    got, (_, _, clip), _ = train(strategy, batches(n=10, poison=(), nan=(5, 6)), rewind, loss=False)
    assert clip.latest_rewind() == distclip.RewindEvent(at=7, to=5, skip_through=8, stopped=False)
    assert int(clip.skipped_steps.numpy()) == 0  # the one non-finite skip before was undone with the rest
    want, _, _ = train(strategy, batches(n=10, poison=()), None, skip={4, 5, 6, 7}, loss=False)
    assert_same(got, want)


def test_the_limit_stops_training_at_the_last_good_snapshot(mirrored, tmp_path):
    rewind = distclip.Rewind(every=3, keep=1, skip=0, factor=4.0, window=3, max_rewinds=1, max_rewinds_per=100)
    stream = batches(n=14, poison=(6, 9))
    got, (model, optimizer, clip), step = train(mirrored, stream, rewind)
    event = clip.latest_rewind()
    assert event.stopped and event.at == 10
    # The variables hold the snapshot taken before update `to`: the oracle stopped there.
    want, _, _ = train(mirrored, stream[:event.to - 1], None)
    assert_same(got, want)
    x, y = stream[0]
    step(shard(mirrored, x), shard(mirrored, y))  # every update after the stop is skipped
    after = replica_values(mirrored, [*model.trainable_variables, *optimizer.variables])
    assert_same(after, want[:len(after)])
    path = str(tmp_path / "last_good")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, clip=clip)
    with pytest.raises(distclip.RewindLimitError, match=f"update 10 would be rewind 2 .* saved to {path}"):
        clip.check_rewind_limit(lambda: checkpoint.write(path))
    # What was saved resumes training: the stop is cleared (in the file too), the snapshot kept.
    assert tf.train.load_checkpoint(path).get_tensor("clip/rewinding/stopped/.ATTRIBUTES/VARIABLE_VALUE") == 0
    assert int(clip.rewinding.stopped.numpy()) == 0 and int(clip.rewinding.ring_size.numpy()) == 1


def test_a_checkpoint_taken_while_skipping_resumes_the_rewind(mirrored, tmp_path):
    """Cut in the skips after a rewind, with the learning rate still to ramp up after them."""
    stream = batches()
    rewind = distclip.Rewind(**RW, **AFTER)
    want, _, _ = train(mirrored, stream, rewind)
    _, objects, _ = train(mirrored, stream[:11], rewind)  # rewound at update 10, one of two skips left
    assert int(objects[2].rewinding.skip_left.numpy()) == 1 and int(objects[2].rewinding.lr_left.numpy()) == 3
    path = tf.train.Checkpoint(model=objects[0], optimizer=objects[1], clip=objects[2]).write(str(tmp_path / "c"))
    _, fresh, _ = train(mirrored, [], rewind)
    tf.train.Checkpoint(model=fresh[0], optimizer=fresh[1], clip=fresh[2]).read(path).assert_consumed()
    got, _, _ = train(mirrored, stream[11:], rewind, objects=fresh)
    assert_same(got, want)


@pytest.mark.slow  # the same state as a rewind's (test_a_checkpoint_taken_while_skipping_resumes_the_rewind), less the ring
def test_a_checkpoint_keeps_the_window_of_skip_spikes(mirrored, tmp_path):
    """Cut before the spike: the restored window must be full for batch 9 to be skipped as uninterrupted."""
    stream, skip_spikes = batches(), distclip.SkipSpikes(**SKIP)
    want, _, _ = train(mirrored, stream, skip_spikes=skip_spikes)
    _, objects, _ = train(mirrored, stream[:8], skip_spikes=skip_spikes)
    path = tf.train.Checkpoint(model=objects[0], optimizer=objects[1], clip=objects[2]).write(str(tmp_path / "c"))
    _, fresh, _ = train(mirrored, [], skip_spikes=skip_spikes)
    tf.train.Checkpoint(model=fresh[0], optimizer=fresh[1], clip=fresh[2]).read(path).assert_consumed()
    got, _, _ = train(mirrored, stream[8:], objects=fresh)
    assert_same(got, want)
    assert int(fresh[2].skipped_spikes.numpy()) == 1


@pytest.mark.parametrize("answer", ["rewind", "skip_spikes"])
def test_rewind_compiles_with_xla_and_adds_no_host_op(answer):
    model, optimizer = make_model(), make_optimizer("sgd", momentum=0.9)
    options = ({"rewind": distclip.Rewind(**RW, **AFTER)} if answer == "rewind"
               else {"skip_spikes": distclip.SkipSpikes(**SKIP)})
    clip = distclip.ClipStep(optimizer, 1.0, **options)
    clip.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        return clip.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables, loss=loss)

    for x, y in batches(n=6, poison=(5,)):
        step(x, y)
    if answer == "rewind":
        assert clip.latest_rewind() == distclip.RewindEvent(at=6, to=1, skip_through=8, stopped=False)
    else:
        assert int(clip.skipped_spikes.numpy()) == 1 and int(optimizer.iterations.numpy()) == 5
    graph = step.get_concrete_function(*global_batch()).graph
    assert not host_round_trips(graph)


# ClipOptimizer's SKIP is the rewind's (fast); its decision is ClipStep's (test_a_skipped_spike_equals_...): `slow`.
@pytest.mark.parametrize("answer", ["rewind", pytest.param("skip_spikes", marks=pytest.mark.slow)])
def test_fit_rewinds_to_the_fit_without_the_discarded_batches(mirrored, answer):
    stream = batches(n=14, poison=(9,))

    def fit(stream, rewind, skip_spikes=None):
        with mirrored.scope():
            model = make_model()
            optimizer = distclip.keras.ClipOptimizer(make_optimizer("adam"), 1.0, rewind=rewind,
                                                     skip_spikes=skip_spikes)
            model.compile(optimizer=optimizer, loss="mse")
        x = np.concatenate([b[0] for b in stream])
        y = np.concatenate([b[1] for b in stream])
        model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, epochs=1, verbose=0)
        return model, optimizer

    if answer == "rewind":
        model, optimizer = fit(stream, distclip.Rewind(**RW))
        event = optimizer.latest_rewind()
        assert event == distclip.RewindEvent(at=10, to=4, skip_through=12, stopped=False)
        skip = discarded(event)
    else:
        model, optimizer = fit(stream, None, distclip.SkipSpikes(**SKIP))
        assert int(optimizer.skipped_spikes.numpy()) == 1
        skip = {9}
    oracle, oracle_optimizer = fit([b for i, b in enumerate(stream) if i not in skip], None)
    for got, want in zip(model.get_weights(), oracle.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert int(optimizer.iterations.numpy()) == int(oracle_optimizer.iterations.numpy())
    again = distclip.keras.ClipOptimizer.from_config(optimizer.get_config())
    assert (again.rewind, again.skip_spikes) == (optimizer.rewind, optimizer.skip_spikes)
    assert again.rewind == (distclip.Rewind(**RW) if answer == "rewind" else None)


@pytest.mark.parametrize("kwargs, named", [
    (dict(every=0), "every=0"), (dict(every=2, keep=1.5), "keep=1.5"), (dict(every=2, skip=-1), "skip=-1"),
    (dict(every=2, factor=1.0), "factor=1.0"), (dict(every=2, zscore=float("nan")), "zscore=nan"),
    (dict(every=2, window=1), "window=1"), (dict(every=2, nonfinite_in_row=0), "nonfinite_in_row=0"),
    (dict(every=2, factor=None), "all three None"), (dict(every=2, placement="gpu"), "placement='gpu'"),
    # Past int64, or past what the counters can add to an update number, or what a ring can hold:
    (dict(every=2 ** 63), f"every must be an integer from 1 to {2 ** 62}; got every={2 ** 63}"),
    (dict(every=2, skip=2 ** 63 - 1), f"skip must be an integer from 0 to {2 ** 62}; got skip={2 ** 63 - 1}"),
    (dict(every=2, max_rewinds_per=2 ** 64), f"max_rewinds_per must be an integer from 1 to {2 ** 62}"),
    (dict(every=2, keep=10 ** 12), f"keep must be an integer from 1 to {2 ** 16}; got keep={10 ** 12}"),
    (dict(every=2, lr_factor=1.0, lr_updates=5), "lr_factor must be a number > 0.0 and < 1.0; got lr_factor=1.0"),
    (dict(every=2, lr_factor=0.5), "lr_factor and lr_updates go together"),
    (dict(every=2, lr_factor=0.5, lr_updates=0), f"lr_updates must be an integer from 1 to {2 ** 62}; got lr_updates=0"),
    (dict(every=2, lr_ramp="step"), "lr_ramp='step' shapes the learning-rate factor after a rewind; without lr_factor"),
    (dict(every=2, lr_factor=0.5, lr_updates=5, lr_ramp="cosine"), "lr_ramp must be 'linear' or 'step'"),
    (dict(every=2, reset_moments="yes"), "reset_moments must be True or False; got reset_moments='yes'"),
])
def test_bad_rewind_arguments_are_named(kwargs, named):
    with pytest.raises(distclip.ArgumentError, match=named.replace("(", r"\(")):
        distclip.Rewind(**kwargs)


@pytest.mark.parametrize("make, named", [
    (lambda: distclip.SkipSpikes(window=1), "window=1"), (lambda: distclip.SkipSpikes(zscore=0), "zscore=0"),
    (lambda: distclip.SkipSpikes(factor=1.0), "factor=1.0"), (lambda: distclip.Rewind(2, two_sided=1), "two_sided=1"),
    (lambda: distclip.SkipSpikes(zscore=None), "both None"),
    (lambda: distclip.ClipStep(make_optimizer("sgd"), 1.0, skip_spikes=distclip.Rewind(every=2)),
     "skip_spikes=Rewind("),
    (lambda: distclip.ClipStep(make_optimizer("sgd"), 1.0, skip_spikes=distclip.SkipSpikes(), nonfinite="raise"),
     "skip_spikes needs nonfinite='skip'"),
    (lambda: distclip.ClipStep(make_optimizer("sgd"), 1.0, skip_spikes=distclip.SkipSpikes(),
                               rewind=distclip.Rewind(every=2)), "pass one; got rewind=Rewind("),
    (lambda: distclip.ClipStep(keras.optimizers.Adagrad(), 1.0, rewind=distclip.Rewind(2, reset_moments=True)),
     "reset_moments=True: Adagrad has no moment slots distclip knows (it resets those of Adam, Nadam, Lamb"),
    (lambda: distclip.keras.ClipOptimizer(make_optimizer("sgd"), 1.0, rewind=distclip.Rewind(2, reset_moments=True)),
     "reset_moments=True: SGD(momentum=0) has no moment slots to reset"),
])
def test_bad_skip_spikes_arguments_are_named(make, named):
    with pytest.raises(distclip.ArgumentError) as e:
        make()
    assert named in str(e.value), str(e.value)


def test_a_ring_larger_than_memory_is_refused_when_building_before_anything_is_made():
    model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000)])
    clip = distclip.ClipStep(make_optimizer("adam"), 1.0, rewind=distclip.Rewind(every=2, keep=2 ** 16))
    # 1,001,000 parameters with Adam's two slots: 12,012,xxx bytes a snapshot, 65,536 of them.
    with pytest.raises(distclip.ArgumentError, match=r"keep=65536 snapshots of 12,01\d,\d+ bytes each .* need "
                                                     r"7\d\d\.\d GiB for the ring, more than this machine's"):
        clip.build(model.trainable_variables)
    assert clip.rewinding.ring == []


def test_rewind_is_refused_where_it_cannot_skip_and_a_bad_loss_is_named():
    optimizer = make_optimizer("sgd")
    with pytest.raises(distclip.ArgumentError, match="nonfinite='skip'.*nonfinite='raise'"):
        distclip.ClipStep(optimizer, 1.0, nonfinite="raise", rewind=distclip.Rewind(every=2))
    with pytest.raises(distclip.ArgumentError, match="rewind=3"):
        distclip.ClipStep(optimizer, 1.0, rewind=3)
    model = make_model()
    clip = distclip.ClipStep(optimizer, 1.0, rewind=distclip.Rewind(every=2))
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(distclip.ArgumentError, match="loss must be a float scalar"):
        clip.apply(grads, model.trainable_variables, loss=tf.zeros([2]))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))


def test_a_keras_file_keeps_the_rewind_and_continues_as_the_uninterrupted_fit(tmp_path):
    """`model.save` / `keras.saving.load_model` at three points (the window not yet full, in the skip phase after
    a rewind, and after the limit stopped the rewinds), then `fit` on the rest of the stream: equal to the
    uninterrupted `fit`, bit for bit (the oracle: Keras's own saving and `fit`). The threshold is an `AutoClip`,
    so its state (the norms seen) goes through the file too, and so does the learning-rate factor's after the
    rewind."""
    rewind = distclip.Rewind(every=3, keep=1, skip=2, factor=4.0, window=3, max_rewinds=1, max_rewinds_per=100,
                             **AFTER)
    stream = batches(n=16, poison=(6, 11))
    x = np.concatenate([b[0] for b in stream])
    y = np.concatenate([b[1] for b in stream])
    rows = GLOBAL_BATCH

    def fit(model, first, last):
        model.fit(x[first * rows:last * rows], y[first * rows:last * rows], batch_size=rows, shuffle=False,
                  epochs=1, verbose=0)

    def clip_optimizer():
        return distclip.keras.ClipOptimizer(make_optimizer("adam"), distclip.AutoClip(50.0, 8), rewind=rewind)

    model = make_model()
    model.compile(optimizer=clip_optimizer(), loss="mse")
    fit(model, 0, 16)
    assert model.optimizer.latest_rewind() == distclip.RewindEvent(at=12, to=4, skip_through=12, stopped=True)
    want = [v.numpy() for v in [*model.variables, *model.optimizer.variables, *model.optimizer.rewinding.state()]]
    for cut, state in ((2, "history_count"), (8, "skip_left"), (13, "stopped")):
        part = make_model()
        part.compile(optimizer=clip_optimizer(), loss="mse")
        fit(part, 0, cut)
        assert int(getattr(part.optimizer.rewinding, state).numpy()) > 0 or state == "history_count"
        assert int(part.optimizer.rewinding.lr_left.numpy()) == (0 if cut == 2 else 3)  # set by each rewind
        part.save(tmp_path / f"at-{cut}.keras")
        loaded = keras.saving.load_model(tmp_path / f"at-{cut}.keras")
        assert type(loaded.optimizer) is distclip.keras.ClipOptimizer
        for a, b in zip(part.optimizer.rewinding.state(), loaded.optimizer.rewinding.state(), strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        fit(loaded, cut, 16)
        got = [v.numpy() for v in [*loaded.variables, *loaded.optimizer.variables,
                                   *loaded.optimizer.rewinding.state()]]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


@pytest.mark.slow  # the mechanism of the test above, with SkipSpikes' state and ZClip's, under per-group thresholds
def test_a_keras_file_keeps_skip_spikes_groups_and_zclip_and_continues_as_the_uninterrupted_fit(tmp_path):
    """Saved after 8 batches (the window full, ZClip warmed up as the global threshold over the biases' own
    clip), loaded, then `fit` on the rest, whose batch 9 is skipped as a spike: equal to the uninterrupted `fit`,
    bit for bit."""
    stream = batches(n=12, poison=(9,))
    x = np.concatenate([b[0] for b in stream])
    y = np.concatenate([b[1] for b in stream])

    def fit(model, first, last):
        model.fit(x[first * GLOBAL_BATCH:last * GLOBAL_BATCH], y[first * GLOBAL_BATCH:last * GLOBAL_BATCH],
                  batch_size=GLOBAL_BATCH, shuffle=False, epochs=1, verbose=0)

    def compiled():
        model = make_model()
        groups = distclip.ClipGroups([distclip.VariableGroup("biases", 0.05, patterns=[".*bias"])], default=None,
                                     global_clip_norm=distclip.ZClip(z_thresh=1.0, warmup_steps=2, max_grad_norm=None))
        model.compile(optimizer=distclip.keras.ClipOptimizer(make_optimizer("adam"), groups,
                                                             skip_spikes=distclip.SkipSpikes(**SKIP)), loss="mse")
        return model

    def everything(model):
        return [v.numpy() for v in [*model.variables, *model.optimizer.variables,
                                    *model.optimizer.rewinding.state()]]

    whole = compiled()
    fit(whole, 0, 12)
    assert int(whole.optimizer.skipped_spikes.numpy()) == 1
    part = compiled()
    fit(part, 0, 8)
    part.save(tmp_path / "at-8.keras")
    loaded = keras.saving.load_model(tmp_path / "at-8.keras")
    assert loaded.optimizer.skip_spikes == distclip.SkipSpikes(**SKIP)
    assert type(loaded.optimizer.clip_norm.global_clip_norm) is distclip.ZClip
    assert float(np.asarray(loaded.optimizer._update.state.group_scales.numpy())[0]) < 1  # the biases clipped
    fit(loaded, 8, 12)
    assert int(loaded.optimizer.skipped_spikes.numpy()) == 1
    for g, w in zip(everything(loaded), everything(whole), strict=True):
        np.testing.assert_array_equal(g, w)


def test_fit_at_the_limit_saves_last_good_where_and_as_the_docs_say(tmp_path):
    """ClipLogger at the limit: `log_dir/last_good/ckpt` holds the last good snapshot as
    `tf.train.Checkpoint(model=model, optimizer=optimizer)`, and restoring it the documented way into a fresh
    model and optimizer gives the same variables, the stop cleared."""
    rewind = distclip.Rewind(every=3, keep=1, skip=0, factor=4.0, window=3, max_rewinds=1, max_rewinds_per=100)
    stream = batches(n=14, poison=(6, 9))
    x = np.concatenate([b[0] for b in stream])
    y = np.concatenate([b[1] for b in stream])

    def compiled():
        model = make_model()
        model.compile(optimizer=distclip.keras.ClipOptimizer(make_optimizer("adam"), 1.0, rewind=rewind), loss="mse")
        return model

    model = compiled()
    path = str(tmp_path / "last_good" / "ckpt")
    with pytest.raises(distclip.RewindLimitError, match=f"saved to {path}"):
        model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0,
                  callbacks=[distclip.keras.ClipLogger(str(tmp_path))])
    fresh = compiled()
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).read(path).assert_existing_objects_matched()
    for got, want in zip([*fresh.variables, *fresh.optimizer.variables, *fresh.optimizer.rewinding.state()],
                         [*model.variables, *model.optimizer.variables, *model.optimizer.rewinding.state()],
                         strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert int(fresh.optimizer.rewinding.stopped.numpy()) == 0
    with open(tmp_path / "rewinds.csv") as f:
        assert f.read().splitlines() == ["step,to_step,skip_through_step,stopped", "6,3,6,0", "9,3,stopped,1"]
