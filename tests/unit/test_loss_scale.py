"""mixed precision (distclip._src.update): ClipOptimizer(LossScaleOptimizer(...)) decides overflows on the synchronized gradients."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import distclip
from common import GLOBAL_BATCH, global_batch, replica_values


CLIP = 0.3


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test, and puts float32 back."""
    def set_policy(name):
        keras.mixed_precision.set_dtype_policy(name)
    yield set_policy
    keras.mixed_precision.set_dtype_policy("float32")


def _model(seed=1):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1, dtype="float32")])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def _clip_lso(**kwargs):
    return distclip.keras.ClipOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05), **kwargs), CLIP)


def _fit(strategy, optimizer_fn, x, y, **compile_kwargs):
    with strategy.scope():
        model = _model()
        optimizer = optimizer_fn()
        model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0,
                        callbacks=[distclip.keras.ClipLogger()] if isinstance(optimizer, distclip.keras.ClipOptimizer) else [])
    return model, optimizer, history.history


def test_overflow_on_one_replica_skips_everywhere_and_lowers_the_scale_together(mirrored, policy):
    policy("mixed_float16")
    x, y = global_batch(0)
    y[GLOBAL_BATCH - 1] = 6e4  # the scaled float16 gradients overflow on the second replica's half only
    with mirrored.scope():
        before = _model().get_weights()
    model, optimizer, history = _fit(mirrored, _clip_lso, x, y, auto_scale_loss=False)
    lso = optimizer.inner_optimizer
    assert np.array_equal(np.concatenate([w.ravel() for w in model.get_weights()]),
                          np.concatenate([w.ravel() for w in before]))
    assert history["skipped_steps"] == [1.0] and int(optimizer.iterations.numpy()) == 0
    # The loss scale went down once, to the same value on both replicas.
    for values in replica_values(mirrored, [lso.dynamic_scale, lso.step_counter]):
        assert all(np.array_equal(values[0], v) for v in values[1:])
    assert float(lso.dynamic_scale.numpy()) == 2.0 ** 15 / 2
    # The overflow is named: the second replica's own gradients.
    assert optimizer.nonfinite_replicas.numpy().tolist() == [0, 1]

    # Keras's own LossScaleOptimizer decides on the first replica's local gradients: it applies the overflow.
    model, keras_lso, _ = _fit(mirrored, lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05)), x, y)
    assert float(keras_lso.dynamic_scale.numpy()) == 2.0 ** 15
    assert not all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_float16_and_bfloat16_track_float32(mirrored, policy):
    xs, ys = zip(*(global_batch(s) for s in range(8)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    ref, _, ref_hist = _fit(mirrored, lambda: distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), CLIP), x, y)
    for name, make, kwargs in (("mixed_float16", _clip_lso, dict(auto_scale_loss=False)),
                               ("mixed_bfloat16", lambda: distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), CLIP), {})):
        policy(name)
        model, optimizer, hist = _fit(mirrored, make, x, y, **kwargs)
        # Stated tolerance: weights within 0.05 absolute (they move by ~0.4 over these 8 clipped steps of 0.05),
        # the epoch's mean norm within 2 % of float32's.
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(ref.get_weights(), _model().get_weights()))
        assert moved > 0.2
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), ref.get_weights())) <= 0.05, name
        assert hist["global_norm"][0] == pytest.approx(ref_hist["global_norm"][0], rel=0.02), name
        assert hist["skipped_steps"] == [0.0]
        keras.mixed_precision.set_dtype_policy("float32")


def test_the_other_order_is_refused_clearly(policy):
    with pytest.raises(distclip.ArgumentError, match="Put it inside instead"):
        keras.optimizers.LossScaleOptimizer(distclip.keras.ClipOptimizer(keras.optimizers.Adam(), CLIP))
    policy("mixed_float16")
    model = _model()
    with pytest.raises(distclip.ArgumentError, match="auto_scale_loss=False"):
        model.compile(optimizer=_clip_lso(), loss="mse")
    with pytest.raises(distclip.ArgumentError, match="nonfinite"):
        distclip.keras.ClipOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), CLIP, nonfinite="raise")


def test_loss_scale_grows_after_dynamic_growth_steps(policy):
    policy("mixed_float16")
    xs, ys = zip(*(global_batch(s) for s in range(3)))
    _, optimizer, _ = _fit(tf.distribute.get_strategy(), lambda: _clip_lso(dynamic_growth_steps=2),
                           np.concatenate(xs), np.concatenate(ys), auto_scale_loss=False)
    lso = optimizer.inner_optimizer
    assert float(lso.dynamic_scale.numpy()) == 2.0 ** 16 and int(lso.step_counter.numpy()) == 1


def _kernel_shaped_arithmetic(model):
    """Mul/Div ops producing a tensor shaped like the first kernel, in everything `fit` traced,
    except the norm's rare path (a branch taken only when the float32 sum of squares overflows)."""
    from distclip._src.norm import RESCALED_NORM

    shape = tuple(model.trainable_variables[0].shape)
    traced = [c.cell_contents for c in model.train_function.__closure__
              if hasattr(c.cell_contents, "_list_all_concrete_functions")]
    count = 0
    for concrete in [f for t in traced for f in t._list_all_concrete_functions()]:
        graphs = [concrete.graph] + [f.graph for f in concrete.graph._functions.values() if hasattr(f, "graph")]
        for g in graphs:
            for op in g.get_operations():
                if op.type in ("Mul", "MulNoNan", "RealDiv", "Div") and op.outputs and \
                        tuple(op.outputs[0].shape.as_list() or ()) == shape and RESCALED_NORM not in op.name:
                    count += 1
    return count


def test_unscaling_and_clipping_are_one_multiply(policy):
    x, y = global_batch(0)
    default = tf.distribute.get_strategy()
    plain, _, _ = _fit(default, lambda: distclip.keras.ClipOptimizer(keras.optimizers.Adam(0.05), CLIP), x, y)
    policy("mixed_float16")
    scaled, _, _ = _fit(default, _clip_lso, x, y, auto_scale_loss=False)
    keras_lso, _, _ = _fit(default, lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05, global_clipnorm=CLIP)), x, y)
    # Loss scaling adds no pass over the gradients; Keras's LossScaleOptimizer divides before it clips.
    assert _kernel_shaped_arithmetic(scaled) == _kernel_shaped_arithmetic(plain) > 0
    assert _kernel_shaped_arithmetic(keras_lso) > _kernel_shaped_arithmetic(plain)
