"""distclip._src.update: what one update records (the state ClipOptimizer exposes and ClipLogger reads), the
accumulation counters a checkpoint consults, and every step path compiled with XLA with no host round trip."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import global_batch, make_model, make_optimizer, make_wrapper, max_abs_diff, shard
from graphs import host_round_trips, op_types


def _state(opt):
    return (float(opt.global_norm.numpy()), float(opt.clip_norm_used.numpy()), float(opt.clip_scale.numpy()),
            int(opt.skipped_steps.numpy()))


def test_each_update_records_what_it_saw_and_a_skip_keeps_the_last_applied_state():
    model = make_model()
    opt = distclip.keras.ClipOptimizer(make_optimizer("sgd"), 2.0)
    grads = [tf.fill(v.shape, 1.0) for v in model.trainable_variables]
    norm = float(np.sqrt(sum(int(np.prod(v.shape)) for v in model.trainable_variables)))
    r = opt.apply(grads, model.trainable_variables)
    assert _state(opt) == pytest.approx((norm, 2.0, 2.0 / norm, 0))
    assert float(r.global_norm) == pytest.approx(norm) and bool(r.clipped)
    before = model.get_weights()
    opt.apply([g * np.inf for g in grads], model.trainable_variables)
    norm_seen, threshold, scale, skipped = _state(opt)
    assert not np.isfinite(norm_seen) and threshold == 2.0 and scale == 0.0 and skipped == 1
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert int(opt.iterations.numpy()) == 1


def test_accumulation_counters_say_when_the_next_call_applies():
    model = make_model()
    step = distclip.ClipStep(make_optimizer("sgd"), 1.0, accumulation_steps=3)
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    seen = []
    for _ in range(4):
        seen.append((step.pending_micro_batches, step.applies_next))
        step.apply(grads, model.trainable_variables)
    assert seen == [(0, False), (1, False), (2, True), (0, False)]
    assert int(step.optimizer.iterations.numpy()) == 1


def _configs():
    lso = lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))  # noqa: E731
    sgd = lambda: keras.optimizers.SGD(0.1, momentum=0.9)  # noqa: E731
    return {
        "fixed": (sgd, 0.5, {}),
        "none": (sgd, None, {}),
        "AutoClip": (sgd, distclip.AutoClip(50.0, 8), {}),
        "SpikeClip": (sgd, distclip.SpikeClip(1.0, 0.9, 2, initial_clip_norm=0.5), {}),
        "accumulation": (sgd, 0.5, {"accumulation_steps": 2}),
        "loss-scale": (lso, 0.5, {}),
        "agc": (sgd, 0.5, {"agc": distclip.AGC(0.05)}),
        "sparse-fp16": (sgd, 0.5, {"sparse_as_dense": True, "compression": "fp16"}),
    }


def _train(api, config, jit, strategy=None):
    """3 steps of the given step on the tiny model; returns (weights, the traced step's graph)."""
    make_opt, clip_norm, options = _configs()[config]
    with (strategy or tf.distribute.get_strategy()).scope():
        model, opt = make_model(), make_opt()
        wrapper = make_wrapper(api, opt, clip_norm, **options)

    def replica(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
            if config == "loss-scale":
                loss = opt.scale_loss(loss)
        return wrapper.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables).global_norm

    step = tf.function(replica, jit_compile=jit) if strategy is None else tf.function(
        lambda x, y: strategy.run(replica, args=(x, y)))
    batches = [global_batch(s) for s in range(3)]
    args = (lambda b: b) if strategy is None else (lambda b: (shard(strategy, b[0]), shard(strategy, b[1])))
    for b in batches:
        step(*args(b))
    return model.get_weights(), step.get_concrete_function(*args(batches[0])).graph


#: ClipStep's paths that other tests compile with XLA and scan for host round trips, against a stronger oracle:
#: the policies (test_policies.py, a spike clipped) and accumulation (test_accumulation.py, the larger batch).
COMPILED_ELSEWHERE = {"AutoClip", "SpikeClip", "accumulation"}


def _compiled_cases():
    """ClipStep's paths but COMPILED_ELSEWHERE; ClipOptimizer's are `slow` (the fast tier compiles it through fit:
    keras/test_optimizer.py)."""
    return ([("ClipStep", c) for c in sorted(_configs()) if c not in COMPILED_ELSEWHERE]
            + [pytest.param("ClipOptimizer", c, marks=pytest.mark.slow) for c in sorted(_configs())])


@pytest.mark.parametrize("api,config", _compiled_cases())
def test_every_step_path_compiles_with_xla_and_never_waits_for_the_host(api, config):
    compiled, graph = _train(api, config, jit=True)
    plain, _ = _train(api, config, jit=False)
    # float16 on the wire rounds differently compiled and not (3e-5 seen on TensorFlow 2.17): its precision.
    assert max_abs_diff(compiled, plain) <= (1e-3 if "fp16" in config else 1e-5)
    assert not host_round_trips(graph), host_round_trips(graph)


@pytest.mark.parametrize("config", ["fixed", "SpikeClip", "accumulation", "loss-scale"])
def test_the_replicated_step_never_waits_for_the_host(mirrored, config):
    _, graph = _train("ClipStep", config, jit=False, strategy=mirrored)
    assert "CollectiveReduceV2" in op_types(graph)  # the graph scanned is the synchronized step's
    assert not host_round_trips(graph), host_round_trips(graph)


def test_the_host_round_trip_check_sees_an_assertion():
    # nonfinite="raise" asserts on the host by design (the one policy that may): the scan must see it.
    _, graph = _train_raise()
    assert host_round_trips(graph) == ["Assert"]


def _train_raise():
    model = make_model()
    step = distclip.ClipStep(make_optimizer("sgd"), 0.5, nonfinite="raise")

    @tf.function
    def f(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        return step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables).global_norm

    x, y = global_batch()
    f(x, y)
    return model.get_weights(), f.get_concrete_function(x, y).graph
