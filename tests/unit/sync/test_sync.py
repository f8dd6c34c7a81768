"""distclip._src.sync: which backend synchronizes, in every context one process can hold."""
import sys

import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import global_batch, make_model, make_optimizer, max_abs_diff, reference_train, train_single


@pytest.mark.parametrize("context", ["none", "default", "one_device"])
def test_single_replica_contexts_match_reference(context):
    strategy = {
        "none": tf.distribute.get_strategy(),
        "default": tf.distribute.get_strategy(),
        "one_device": tf.distribute.OneDeviceStrategy("/cpu:0"),
    }[context]
    if context == "none":
        # No strategy at all: no scope, call directly.
        model, opt = make_model(), make_optimizer("adam")
        step = distclip.ClipStep(opt, 0.2)
        for s in range(3):
            x, y = global_batch(s)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            step.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        weights = model.get_weights()
    else:
        weights, _ = train_single(strategy, 0.2, use_pairs=context == "default")
    ref, _ = reference_train(0.2, 3)
    assert max_abs_diff(weights, ref) <= 1e-6


def test_reduction_mean_and_backend_none(mirrored):
    per = [np.array([3.0, 4.0], "float32"), np.array([6.0, 8.0], "float32")]
    dist = mirrored.experimental_distribute_values_from_function(lambda c: tf.constant(per[c.replica_id_in_sync_group]))

    def norms(**kw):
        out = mirrored.run(tf.function(lambda g: distclip.sync_and_clip([g], 1.0, **kw).global_norm), args=(dist,))
        return [float(v) for v in mirrored.experimental_local_results(out)]

    assert norms() == pytest.approx([15.0, 15.0])                      # SUM: [9, 12]
    assert norms(reduction="mean") == pytest.approx([7.5, 7.5])        # MEAN: [4.5, 6]
    assert norms(backend="tf_distribute", reduction="sum") == pytest.approx([15.0, 15.0])
    assert norms(backend="none") == pytest.approx([5.0, 10.0])         # already-synchronized: no collective


G = [tf.constant([3.0, 4.0])]


def test_cross_replica_context_is_an_error(mirrored):
    with mirrored.scope():
        with pytest.raises(distclip.ContextError, match=r"cross-replica context .* call it inside the replica function: strategy.run"):
            distclip.sync_and_clip(G, 1.0)


def _engine_in_context(strategy=None, inside_run=False, variables=()):
    """(name, replicas, rank, size) of `distclip._src.sync.current` where the clip step, a callback or verify would ask."""
    from distclip._src import sync

    def ask():
        b = sync.current(variables)
        return b.name, b.num_replicas(), b.rank(), b.size()

    if strategy is None:
        return ask()
    with strategy.scope():
        if not inside_run:
            return ask()
        found = []
        strategy.run(lambda: found.append(ask()))
        assert len(set(found)) == 1, found
        return found[0]


def test_one_function_decides_the_engine_in_every_context(mirrored):
    assert _engine_in_context() == ("none", 1, 0, 1)
    assert _engine_in_context(tf.distribute.get_strategy()) == ("none", 1, 0, 1)
    assert _engine_in_context(tf.distribute.OneDeviceStrategy("/cpu:0"), inside_run=True) == ("none", 1, 0, 1)
    assert _engine_in_context(mirrored) == ("tf_distribute", 2, 0, 1)
    assert _engine_in_context(mirrored, inside_run=True) == ("tf_distribute", 2, 0, 1)
    with mirrored.scope():
        v = tf.Variable(1.0)
    # Mirrored variables name their strategy even outside its scope (verify_replicas, broadcast_from_root).
    assert _engine_in_context(variables=[v]) == ("tf_distribute", 2, 0, 1)
    assert _engine_in_context(variables=[tf.Variable(1.0)]) == ("none", 1, 0, 1)


def test_all_gather_returns_every_replicas_value_in_order(mirrored):
    from distclip._src import sync

    with mirrored.scope():
        backend = sync.current()
    replica_ids = backend.all_gather(
        lambda: tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64) + 10, "test")
    assert replica_ids.tolist() == [10, 11]
    assert sync.current().all_gather(lambda: tf.constant([1.5, 2.5]), "test").tolist() == [[1.5, 2.5]]
    with mirrored.scope():
        with pytest.raises(distclip.ContextError, match="test was called inside strategy.run"):
            mirrored.run(lambda: backend.all_gather(lambda: tf.constant(1), "test"))


def test_broadcast_from_root_checks_root_against_the_backend(mirrored):
    with mirrored.scope():
        v = tf.Variable([1.0, 2.0])
    with pytest.raises(distclip.ArgumentError, match=r"root=1 but tf_distribute has 1 processes"):
        distclip.broadcast_from_root([v], root=1)
    with pytest.raises(distclip.ArgumentError, match=r"root=-1"):
        distclip.broadcast_from_root([v], root=-1)


def test_an_mpi_world_is_used_only_where_one_was_launched(monkeypatch):
    from distclip._src.sync import mpi

    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert not mpi.active()
    assert "mpi4py.MPI" not in sys.modules  # not imported (which would initialize MPI) to find out
    with pytest.raises(distclip.ContextError, match="no MPI world of more than one process"):
        mpi.MPIBackend()
