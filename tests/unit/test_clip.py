"""distclip._src.clip: one packed reduction per step, and a ClipResult usable in tf.function."""
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import distributed_train, global_batch, shard
from graphs import collectives, op_types, reduced_elements


def _trace(strategy, mode):
    _, _, _, objs = distributed_train(strategy, 0.5, 0, mode=mode)
    x, y = global_batch()
    n_params = sum(int(tf.size(v)) for v in objs["model"].trainable_variables)
    return objs["step"].get_concrete_function(shard(strategy, x), shard(strategy, y)), n_params


def test_one_packed_reduction(mirrored):
    plain, n_params = _trace(mirrored, "unclipped")
    ours, _ = _trace(mirrored, "clipstep")
    plain_elems, plain_ops, plain_nested = reduced_elements(plain)
    our_elems, our_ops, our_nested = reduced_elements(ours)  # nested: elements in nested functions
    replicas = mirrored.num_replicas_in_sync

    assert plain_elems == replicas * n_params, "the baseline itself must reduce every gradient once"
    # Each replica adds its report: a non-finite flag per replica and its own sum of squares.
    assert our_elems == plain_elems + replicas * (replicas + 1)
    # One packed collective per device, none hidden in the skip conditionals.
    assert our_ops == replicas
    assert our_nested == 0 and plain_nested == 0


def test_variable_norms_the_noise_scale_agc_and_groups_add_nothing_to_the_collectives(mirrored):
    """The opt-ins read what the default step already has (AGC: the mirrored weights; groups: each gradient's
    squared norm): the same collectives, the same elements."""
    x, y = global_batch()
    groups = distclip.ClipGroups([distclip.VariableGroup("biases", 0.1, patterns=[".*bias"])], default=0.5,
                                 global_clip_norm=distclip.AutoClip())
    found = []
    for clip_norm, options in ((0.5, {}),
                               (0.5, {"variable_norms": True, "noise_scale": distclip.NoiseScale(global_batch_size=16)}),
                               (0.5, {"variable_norms": True, "agc": distclip.AGC(0.01)}),
                               (groups, {"variable_norms": True, "agc": distclip.AGC(0.01)})):
        _, _, _, objs = distributed_train(mirrored, clip_norm, 0, **options)
        found.append(sorted(collectives(objs["step"].get_concrete_function(shard(mirrored, x),
                                                                             shard(mirrored, y)).graph)))
    assert found[0] == found[1] == found[2] == found[3] and len(found[0]) == mirrored.num_replicas_in_sync


def test_each_replica_measures_and_scales_its_own_copy_once(mirrored):
    """Every replica does its own norm pass and multiply on the reduced gradients, as on its own GPU, once."""
    ours, _ = _trace(mirrored, "clipstep")
    gradients = 4  # the tiny model's two kernels and two biases
    replicas = mirrored.num_replicas_in_sync
    ops = op_types(ours.graph)
    # Per replica: one squared norm per gradient of its own (the report), one per reduced gradient in the
    # main pass, and one in the (rarely taken) rescaled pass.
    assert ops.count("L2Loss") == 3 * gradients * replicas, ops.count("L2Loss")
    assert ops.count("MulNoNan") == gradients * replicas, ops.count("MulNoNan")


def test_result_is_a_namedtuple_usable_in_tf_function():
    @tf.function
    def f(g):
        return distclip.sync_and_clip([g], 2.0)

    r = f(tf.constant([3.0, 4.0]))
    assert isinstance(r, distclip.ClipResult)
    assert r._fields == ("grads", "global_norm", "scale", "clipped", "finite", "nonfinite_replicas",
                         "nonfinite_variables", "variable_norms", "noise", "loss", "group_norms", "group_scales")
    assert float(r.global_norm) == 5.0 and float(r.scale) == pytest.approx(0.4)
    assert bool(r.clipped) and bool(r.finite)
    np.testing.assert_allclose(r.grads[0].numpy(), [1.2, 1.6], rtol=1e-6)
    zero = distclip.sync_and_clip([tf.zeros([3])], 1.0)
    assert float(zero.scale) == 1.0 and not bool(zero.clipped)
    skipped = distclip.sync_and_clip([tf.constant([1.0, np.inf])], 1.0)
    assert float(skipped.scale) == 0.0 and not bool(skipped.finite)
    assert np.array_equal(skipped.grads[0].numpy(), [0.0, 0.0])
