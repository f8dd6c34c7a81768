"""distclip._src.internals: each private Keras or TensorFlow API distclip uses still does, in the installed
release, what distclip relies on (the oracle is Keras and TensorFlow themselves). A test here fails the day
upstream moves or changes one."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from distclip._src import internals


def _built_sgd(variables):
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(variables)
    return optimizer


def test_a_missing_name_is_named_with_the_installed_versions():
    with pytest.raises(internals.InternalAPIError,
                       match=rf"keras.optimizers.Optimizer._trainable_variables, which this Keras {keras.version()} / "
                             rf"TensorFlow {tf.__version__} does not have"):
        internals.built_variables(object())
    with pytest.raises(internals.InternalAPIError, match=f"object.{internals.REDUCTION_HOOK}"):
        internals.set_reduction(object(), lambda pairs: pairs)


def test_the_reduction_hook_sums_across_replicas_and_can_be_replaced_on_one_instance(mirrored):
    with mirrored.scope():
        v = tf.Variable([0.0])
        optimizer = _built_sgd([v])
    assert internals.has_reduction_hook(optimizer)

    def sums():
        def fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            [(g, _)] = getattr(optimizer, internals.REDUCTION_HOOK)([(tf.cast([replica + 1], tf.float32), v)])
            return g
        return [float(t.numpy()[0]) for t in mirrored.experimental_local_results(mirrored.run(fn))]

    assert sums() == [3.0, 3.0]  # 1 + 2: the sum distclip must not repeat
    internals.set_reduction(optimizer, list)
    assert sums() == [1.0, 2.0]  # replaced on this instance only
    assert internals.has_reduction_hook(keras.optimizers.SGD(0.1))
    internals.restore_reduction(optimizer)
    assert sums() == [3.0, 3.0]


def test_a_built_optimizer_knows_its_variables_its_strategy_and_its_own_variables(mirrored):
    a, b = tf.Variable([1.0]), tf.Variable([2.0])
    optimizer = _built_sgd([a])
    internals.check_variables_are_known(optimizer, [a])
    with pytest.raises(ValueError):
        internals.check_variables_are_known(optimizer, [b])
    assert internals.built_variables(optimizer) == [a]
    assert internals.optimizer_strategy(optimizer) is tf.distribute.get_strategy()
    with mirrored.scope():
        assert internals.optimizer_strategy(keras.optimizers.SGD(0.1)) is mirrored
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    lso.build([a])
    own = internals.own_variables(lso)
    inner = {id(v) for v in lso.inner_optimizer.variables}
    assert {id(lso.step_counter), id(lso.dynamic_scale)} <= {id(v) for v in own} and not inner & {id(v) for v in own}
    assert [id(v) for v in own] + [id(v) for v in lso.inner_optimizer.variables] == [id(v) for v in lso.variables]


def test_strategies_say_whether_they_merge_span_workers_and_where_their_host_device_is(mirrored):
    assert not internals.strategy_merges()
    with mirrored.scope():
        assert internals.strategy_merges()  # MirroredStrategy on CPU steps through merge_call
    assert not internals.in_multi_worker_mode(mirrored)
    from tensorflow.python.distribute.collective_all_reduce_strategy import CollectiveAllReduceExtended

    assert callable(getattr(CollectiveAllReduceExtended, "_in_multi_worker_mode"))
    # A SingleDevice, what `colocate_with` takes to make one variable on this host.
    assert tf.DeviceSpec.from_string(internals.host_input_device(mirrored).device).device_type == "CPU"


def test_a_checked_module_refuses_a_checkpoint_before_writing_anything(tmp_path):
    class Refusing(internals.CheckedOnSave):
        def check_on_save(self):
            raise RuntimeError("not now")

    module = Refusing()
    module.v = tf.Variable(1.0)
    with pytest.raises(RuntimeError, match="not now"):
        tf.train.Checkpoint(m=module).write(str(tmp_path / "ckpt"))
    assert list(tmp_path.iterdir()) == []
    internals.CheckedOnSave().check_on_save()  # the default refuses nothing
    tf.train.Checkpoint(m=internals.CheckedOnSave()).write(str(tmp_path / "ok"))


def test_the_trainer_builds_from_one_batch_under_its_strategy_and_its_functions_can_be_replaced(mirrored):
    build, reduce = internals.trainer_functions()
    assert callable(build) and callable(reduce)
    try:
        internals.replace_trainer_functions(len, max)
        assert internals.trainer_functions() == (len, max)
    finally:
        internals.replace_trainer_functions(build, reduce)
    assert internals.trainer_functions() == (build, reduce)
    with mirrored.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    assert internals.trainer_strategy(model) is mirrored
    assert not model.optimizer.built
    internals.symbolic_build(model, (np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32")))
    assert model.optimizer.built and model.compiled_loss is not None


@pytest.mark.parametrize("rate", [0.5, keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)], ids=["float", "schedule"])
def test_the_learning_rate_is_scaled_inside_the_block_on_every_replica_and_is_the_same_object_after(mirrored, rate):
    """Keras's own apply, inside the block, takes the step an optimizer with the scaled rate takes (the oracle:
    SGD built with that rate); MirroredStrategy traces its replicas in threads, each must read its own rate."""
    with mirrored.scope():
        v, w = tf.Variable([1.0, 2.0]), tf.Variable([1.0, 2.0])
        scaled = keras.optimizers.SGD(rate)
        scaled.build([v])
        scaled.iterations.assign(1)  # the schedule's rate at step 1: 0.25
        oracle = keras.optimizers.SGD(0.25 * 0.5)
        oracle.build([w])
    original = vars(scaled)["_learning_rate"]

    @tf.function
    def step():
        def fn():
            with internals.learning_rate_times(scaled, tf.constant(0.5)):
                scaled.apply([tf.constant([1.0, 1.0])], [v])
            oracle.apply([tf.constant([1.0, 1.0])], [w])
        mirrored.run(fn)

    if isinstance(rate, float):
        oracle.learning_rate.assign(0.5 * 0.5)
    step()
    for a, b in zip(mirrored.experimental_local_results(v), mirrored.experimental_local_results(w), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert vars(scaled)["_learning_rate"] is original


@pytest.mark.parametrize("name, kwargs, not_moments", [
    ("Adam", {"amsgrad": True}, ()), ("AdamW", {}, ()), ("Nadam", {}, ("_u_product",)), ("Lamb", {}, ()),
    ("Adamax", {}, ()), ("Lion", {}, ()), ("RMSprop", {"momentum": 0.9, "centered": True}, ()),
    ("SGD", {"momentum": 0.9}, ()),
])
def test_the_moment_slots_are_every_optimizer_variable_but_its_counters(name, kwargs, not_moments):
    """Keras as the oracle: a built optimizer's variables less `iterations`, `learning_rate` and its other scalar
    counters are exactly what `moment_slots` returns, one per trainable variable and attribute."""
    optimizer = getattr(keras.optimizers, name)(**kwargs)
    a, b = tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])
    optimizer.build([a, b])
    slots = internals.moment_slots(optimizer)
    counters = {id(optimizer.iterations), id(vars(optimizer)["_learning_rate"]),
                *(id(getattr(optimizer, attr)) for attr in not_moments)}
    rest = [v for v in optimizer.variables if id(v) not in counters]
    assert [id(v) for v in slots] and sorted(id(v) for v in slots) == sorted(id(v) for v in rest)
    assert {tuple(v.shape) for v in slots} == {(2,), (1, 1)}
