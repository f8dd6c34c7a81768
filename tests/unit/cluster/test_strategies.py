"""distclip.cluster.strategies: a tf.distribute strategy by name, with errors that name the argument."""
import pytest
import tensorflow as tf

import distclip
from distclip.cluster.strategies import STRATEGIES, make_strategy


def test_strategies_by_name_in_a_process_split_into_two_logical_cpus():
    assert make_strategy("default") is tf.distribute.get_strategy()
    mirrored = make_strategy("mirrored", replicas=2)
    assert isinstance(mirrored, tf.distribute.MirroredStrategy) and mirrored.num_replicas_in_sync == 2
    with pytest.raises(RuntimeError, match="replicas=3 needs 3 logical CPU devices, but TensorFlow was initialised "
                                           "with 2: create the strategy before any other TensorFlow op"):
        make_strategy("mirrored", replicas=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nccl"), f"strategy must be one of {STRATEGIES}; got strategy='nccl'"),
    (dict(name="mirrored", replicas=0), "replicas must be a positive integer; got replicas=0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(distclip.ArgumentError) as e:
        make_strategy(**kwargs)
    assert message in str(e.value)
