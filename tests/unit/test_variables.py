"""distclip._src.variables: the TensorFlow variable behind a Keras one, and a variable's name in messages."""
import keras
import tensorflow as tf

from distclip._src.variables import tf_variable, variable_name


def test_a_keras_variable_is_unwrapped_and_a_tensorflow_one_kept(mirrored):
    with mirrored.scope():
        layer = keras.layers.Dense(2, name="dense_for_names")
        layer.build((None, 3))
        plain = tf.Variable(1.0, name="plain")
    kernel = tf_variable(layer.kernel)
    assert isinstance(kernel, tf.Variable) and not isinstance(kernel, keras.Variable)
    assert isinstance(kernel, tf.distribute.DistributedValues)  # the mirrored variable the strategy made
    assert tf_variable(plain) is plain
    assert variable_name(layer.kernel) == "dense_for_names/kernel"
    assert variable_name(plain) == "plain:0"
