"""One reduction: a ClipStep step moves no more elements through CollectiveReduceV2 than plain optimizer.apply."""
import tensorflow as tf

from common import GLOBAL_BATCH, global_batch, make_model, make_optimizer, shard
import distclip


def _reduced_elements(concrete):
    """(elements through CollectiveReduceV2 in the step's graph, collectives inside nested functions)."""
    ops = [op for op in concrete.graph.get_operations() if op.type == "CollectiveReduceV2"]
    nested = sum(
        node.op == "CollectiveReduceV2"
        for f in concrete.graph.as_graph_def().library.function
        for node in f.node_def
    )
    return sum(op.inputs[0].shape.num_elements() for op in ops), len(ops), nested


def _trace(strategy, use_clipstep):
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer("adam")
        clip = distclip.ClipStep(optimizer, 0.5)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x) - y)) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            if use_clipstep:
                return clip.apply(grads, model.trainable_variables).global_norm
            optimizer.apply(grads, model.trainable_variables)
            return loss

        return strategy.run(replica_fn, args=(x, y))

    x, y = global_batch()
    n_params = sum(int(tf.size(v)) for v in model.trainable_variables)
    return step.get_concrete_function(shard(strategy, x), shard(strategy, y)), n_params


def test_one_packed_reduction(mirrored):
    plain, n_params = _trace(mirrored, use_clipstep=False)
    ours, _ = _trace(mirrored, use_clipstep=True)
    plain_elems, plain_ops, plain_nested = _reduced_elements(plain)
    our_elems, our_ops, our_nested = _reduced_elements(ours)
    replicas = mirrored.num_replicas_in_sync

    assert plain_elems == replicas * n_params, "the baseline itself must reduce every gradient once"
    assert our_elems <= plain_elems + replicas
    # One packed collective per device, none hidden in the skip conditionals.
    assert our_ops == replicas
    assert our_nested == 0 and plain_nested == 0
