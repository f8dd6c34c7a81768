"""One reduction: a ClipStep step moves no more elements through CollectiveReduceV2 than plain optimizer.apply."""
import tensorflow as tf

from common import distributed_train, global_batch, shard


def _reduced_elements(concrete):
    """(elements through CollectiveReduceV2 in the step's graph, how many such ops, how many in nested functions)."""
    ops = [op for op in concrete.graph.get_operations() if op.type == "CollectiveReduceV2"]
    nested = sum(
        node.op == "CollectiveReduceV2"
        for f in concrete.graph.as_graph_def().library.function
        for node in f.node_def
    )
    return sum(op.inputs[0].shape.num_elements() for op in ops), len(ops), nested


def _trace(strategy, mode):
    _, _, _, objs = distributed_train(strategy, 0.5, 0, mode=mode)
    x, y = global_batch()
    n_params = sum(int(tf.size(v)) for v in objs["model"].trainable_variables)
    return objs["step"].get_concrete_function(shard(strategy, x), shard(strategy, y)), n_params


def test_one_packed_reduction(mirrored):
    plain, n_params = _trace(mirrored, "unclipped")
    ours, _ = _trace(mirrored, "clipstep")
    plain_elems, plain_ops, plain_nested = _reduced_elements(plain)
    our_elems, our_ops, our_nested = _reduced_elements(ours)
    replicas = mirrored.num_replicas_in_sync

    assert plain_elems == replicas * n_params, "the baseline itself must reduce every gradient once"
    assert our_elems <= plain_elems + replicas
    # One packed collective per device, none hidden in the skip conditionals.
    assert our_ops == replicas
    assert our_nested == 0 and plain_nested == 0
