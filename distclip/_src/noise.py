"""The gradient noise scale (McCandlish et al., "An Empirical Model of Large-Batch Training", 2018), per update.

With n replicas, each computing a gradient G_r on its own b = B/n examples,
and G = (1/n) sum_r G_r the synchronized gradient of the global batch B,

    |G_small|^2 = (1/n) sum_r |G_r|^2                    (batch b)
    |G_big|^2   = |G|^2                                   (batch B)
    |g|^2       = (B |G_big|^2 - b |G_small|^2) / (B - b)  = (n |G_big|^2 - |G_small|^2) / (n - 1)
    tr(Sigma)   = (|G_small|^2 - |G_big|^2) / (1/b - 1/B) = B (|G_small|^2 - |G_big|^2) / (n - 1)

are unbiased estimates of the true gradient's squared norm |g|^2 and of the
trace of the per-example gradient covariance Sigma. Each is noisy from one
step to the next, so both are smoothed by an exponential moving average
(bias-corrected, as Adam's moments), and

    B_simple = EMA(tr(Sigma)) / EMA(|g|^2)

is the noise scale: in examples, about the batch size beyond which a larger
batch brings little more progress per step (the critical batch size is of
this order). The n replicas' own gradients are the small batches, so it costs
one pass over each replica's gradients and one element on the packed
all-reduce (`distclip._src.nonfinite.replica_report`), and needs n >= 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import tensorflow as tf

from distclip._src.checks import check_integer, check_number
from distclip._src.errors import ArgumentError, ContextError
from distclip._src.threshold import MakeVariable
from distclip._src.variables import read_value


@dataclass(frozen=True)
class NoiseScale:
    """Asks `ClipStep` or `ClipOptimizer` to estimate the gradient noise scale at every update.

    Args:
      global_batch_size: B, the examples in one update over all replicas (and
        all micro-batches, with `accumulation_steps`); each replica's share
        B/n is the small batch, so B must be a multiple of the n replicas
        (checked when the step is built).
      decay: the moving averages' decay, in [0, 1): each update weighs 1 - decay.

    Raises:
      ArgumentError: a batch size outside 2 to 2**53 or a decay outside [0, 1); when the step is built, a
        batch size the replicas cannot share equally.
    """

    global_batch_size: int
    decay: float = 0.99

    def __post_init__(self) -> None:
        check_integer("global_batch_size", self.global_batch_size, 2, 2 ** 53)  # exact as a float64
        check_number("decay", self.decay, 0, 1, low_open=False, high_open=True, rule="a number in [0, 1)")


class NoiseEstimate(NamedTuple):
    """The smoothed estimates after an update (float32 scalars, identical on every replica).

    Fields:
      gradient_squared: EMA of the unbiased |g|^2, the true gradient's squared norm.
      trace: EMA of the unbiased tr(Sigma), the per-example gradient covariance's trace.
      b_simple: `trace / gradient_squared`, the noise scale in examples (meaningful once
        `gradient_squared` is clearly above 0; early on, or near a minimum, it is noisy).
    """

    gradient_squared: tf.Tensor
    trace: tf.Tensor
    b_simple: tf.Tensor


def unbiased(big_squared: tf.Tensor, small_squared: tf.Tensor, replicas: int, global_batch_size: int) -> Any:
    """(|g|^2, tr(Sigma)) from |G_big|^2 and |G_small|^2 (the module docstring's formulas), float32 scalars."""
    n = float(replicas)
    return ((n * big_squared - small_squared) / (n - 1.0),
            float(global_batch_size) * (small_squared - big_squared) / (n - 1.0))


class NoiseState:
    """The moving averages and their update count, in variables made by `make_variable` (saved with their owner)."""

    def __init__(self, config: NoiseScale, make_variable: MakeVariable):
        self.config = config
        self.gradient_squared = make_variable("noise_gradient_squared", (), tf.float32, 0.0)
        self.trace = make_variable("noise_trace", (), tf.float32, 0.0)
        self.updates = make_variable("noise_updates", (), tf.int64, 0)

    def record(self, global_norm: tf.Tensor, replica_squares: tf.Tensor, replicas: int,
               finite: tf.Tensor) -> NoiseEstimate:
        """Takes in one update's estimates (none on a non-finite step); returns the smoothed, bias-corrected ones.

        `replica_squares` is `sum_r |G_r|^2 / n^2`, in the units of `global_norm`.
        """
        g2, trace = unbiased(tf.square(global_norm), replicas * replica_squares, replicas,
                             self.config.global_batch_size)
        beta = self.config.decay
        for var, x in ((self.gradient_squared, g2), (self.trace, trace)):
            value = read_value(var)
            var.assign(tf.where(finite, beta * value + (1.0 - beta) * x, value))
        self.updates.assign(read_value(self.updates) + tf.cast(finite, tf.int64))
        return self.latest()

    def latest(self) -> NoiseEstimate:
        """The smoothed estimates as the variables hold them now."""
        g2, trace, count = (read_value(v) for v in (self.gradient_squared, self.trace, self.updates))
        correction = 1.0 - tf.pow(tf.constant(self.config.decay, tf.float32), tf.cast(count, tf.float32))
        safe = tf.where(correction > 0, correction, 1.0)
        g2, trace = g2 / safe, trace / safe
        return NoiseEstimate(gradient_squared=g2, trace=trace, b_simple=trace / g2)


def check_replicas(replicas: int, config: NoiseScale) -> None:
    """Raises ContextError unless there are at least 2 replicas, and ArgumentError unless they share
    `config.global_batch_size` equally."""
    if replicas < 2:
        raise ContextError(f"noise_scale needs at least 2 replicas (each replica's gradient is one small batch); "
                           f"this step has {replicas}")
    if config.global_batch_size % replicas:
        raise ArgumentError(
            f"NoiseScale(global_batch_size={config.global_batch_size}) is not a multiple of the {replicas} replicas: "
            "each replica's gradient is taken over global_batch_size / replicas examples. Pass the real global "
            "batch (over all replicas and micro-batches)")

