"""distclip._src.options: every option of sync_and_clip, ClipStep and ClipOptimizer is checked when given, naming it."""

import keras
import pytest
import tensorflow as tf

import distclip
from common import make_optimizer


G = [tf.constant([3.0, 4.0])]


@pytest.mark.parametrize("kwarg, value", [("nonfinite", "ignore"), ("reduction", "max"), ("backend", "nccl"), ("nonfinite", None)])
def test_bad_choices(kwarg, value):
    with pytest.raises(ValueError, match=f"{kwarg} must be one of .*{kwarg}={value!r}"):
        distclip.sync_and_clip(G, 1.0, **{kwarg: value})
    with pytest.raises(ValueError, match=f"{kwarg}={value!r}"):
        distclip.ClipStep(make_optimizer("sgd"), 1.0, **{kwarg: value})


def test_accumulation_steps_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True, "2", 2 ** 31, 2 ** 64):
        with pytest.raises(distclip.ArgumentError, match="accumulation_steps"):
            distclip.ClipStep(keras.optimizers.SGD(0.1), 1.0, accumulation_steps=bad)
        with pytest.raises(distclip.ArgumentError, match="accumulation_steps"):
            distclip.keras.ClipOptimizer(keras.optimizers.SGD(0.1), 1.0, accumulation_steps=bad)
