"""distclip._src.nonfinite: the scale each `nonfinite` choice gives a step whose norm is inf or NaN."""
import numpy as np
import pytest
import tensorflow as tf

from distclip._src.nonfinite import NONFINITE, guarded_scale, skips


def test_the_choices():
    assert NONFINITE == ("skip", "raise", "propagate")
    assert [skips(n) for n in NONFINITE] == [True, False, False]


@pytest.mark.parametrize("norm", [np.inf, np.nan])
def test_a_nonfinite_norm_gives_zero_nan_or_an_error(norm):
    scale, norm = tf.constant(0.5), tf.constant(norm, tf.float32)
    finite = tf.math.is_finite(norm)
    assert float(guarded_scale("skip", scale, norm, finite)) == 0.0
    assert np.isnan(float(guarded_scale("propagate", scale, norm, finite)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="global gradient norm is not finite"):
        guarded_scale("raise", scale, norm, finite)


def test_a_finite_norm_keeps_its_scale():
    norm = tf.constant(4.0)
    for nonfinite in NONFINITE:
        assert float(guarded_scale(nonfinite, tf.constant(0.25), norm, tf.math.is_finite(norm))) == 0.25
