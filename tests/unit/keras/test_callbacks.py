"""distclip._src.keras.callbacks: ClipLogger and BroadcastCallback."""

import keras
import pytest

import distclip
from common import GLOBAL_BATCH, make_model
from fitting import data


def test_clip_logger_needs_a_clip_optimizer():
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(1)
    with pytest.raises(distclip.ContextError, match="ClipOptimizer"):
        model.fit(x, y, batch_size=GLOBAL_BATCH, verbose=0, callbacks=[distclip.keras.ClipLogger()])
