"""`sync_and_clip`: synchronize across replicas, then clip by the global norm."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from distclip import sync
from distclip.checks import check_gradients
from distclip.errors import ArgumentError
from distclip.options import StepOptions
from distclip.policies import Policy
from distclip.norm import clip_scale, norm_from_squares, scale_gradients, sum_of_squares
from distclip.sync import buckets, wire
from distclip.result import ClipResult
from distclip.threshold import ClipNorm, resolve_clip_norm


def sync_and_clip(
    grads: Sequence[Optional[Any]],
    clip_norm: ClipNorm,
    *,
    nonfinite: str = "skip",
    reduction: str = "auto",
    backend: str = "auto",
    step: Optional[tf.Tensor] = None,
    sparse_as_dense: bool = False,
    compression: Optional[str] = None,
    bucket_mb: Union[None, float, str] = "auto",
) -> ClipResult:
    """All-reduce `grads` across replicas, then clip them by their global L2 norm.

    With `g_i` the gradients after the all-reduce (identical on every replica):

        global_norm = sqrt(sum_i ||g_i||_2^2)            (accumulated in float32)
        scale       = min(1, clip_norm / global_norm)
        g_i        <- g_i * scale

    which is `tf.clip_by_global_norm` applied to the synchronized gradients, so
    the result equals single-device training on the global batch. Under
    `reduction="mean"` the replicas' gradients are summed and the 1/n is part
    of the one multiply by `scale / n`.

    Args:
      grads: this replica's gradients; `None` entries pass through as `None`.
      clip_norm: the threshold, in units of the global norm: a positive finite
        number, a scalar tensor or variable, a callable of `step`, or None:
        no clipping (synchronize only; `global_norm` is still reported).
      nonfinite: if `global_norm` is inf or NaN: "skip" returns zero gradients,
        `scale=0` and `finite=False` (`ClipStep` then skips the update on every
        replica); "raise" fails the step with an error naming the norm;
        "propagate" behaves like `tf.clip_by_global_norm` (NaN gradients).
      reduction: "auto" (SUM under tf.distribute, where per-replica losses are
        divided by the global batch; MEAN under Horovod), "sum" or "mean".
      backend: "auto", "tf_distribute", "horovod" or "none" (see `distclip.sync`).
      step: the step number, needed only when `clip_norm` is a callable.
      sparse_as_dense: send `tf.IndexedSlices` as dense tensors in the packed
        all-reduce instead of all-gathering them (see `distclip.sync.wire`).
      compression: None or "fp16": float32/float64 gradients travel as float16;
        the norm is computed on the decompressed values.
      bucket_mb: "auto" (25 MB buckets under Horovod, where they measured
        faster; one packed all-reduce under tf.distribute), None (one packed
        all-reduce after the backward pass), or buckets of at most this many
        megabytes, last layers first, each sent as soon as it is ready (see
        `distclip.sync.buckets`).

    Must run in a replica context: inside `strategy.run`, or with no strategy.
    """
    options = StepOptions(nonfinite, reduction, backend, sparse_as_dense, compression, bucket_mb=bucket_mb)
    grads = check_gradients(grads)
    if isinstance(clip_norm, Policy):
        raise ArgumentError(
            f"clip_norm={clip_norm!r} is a policy, which keeps state from step to step: use "
            "distclip.ClipStep or distclip.keras.ClipOptimizer, which hold it in variables"
        )
    threshold = resolve_clip_norm(clip_norm, step)  # checks clip_norm
    sync.check_replica_context("sync_and_clip")
    reducer = sync.select(options.backend)
    result, _ = clip_synchronized(grads, reducer, lambda norm: threshold, options)
    return result


def clip_synchronized(
    grads: List[Optional[Any]],
    backend: sync.Backend,
    threshold_of: Callable[[tf.Tensor], tf.Tensor],
    options: StepOptions,
    *,
    micro_batches: int = 1,
    loss_scale: Optional[tf.Tensor] = None,
) -> Tuple[ClipResult, tf.Tensor]:
    """`sync_and_clip`'s reduce, measure, decide and scale, with the threshold a function of the norm.

    Returns the result and the threshold used. `grads` must have been checked
    (`check_gradients`); `backend` reduces them (`distclip.sync.select`). With
    `micro_batches=k` they are sums over k micro-batches, and their mean is
    what is clipped.
    With `loss_scale` S they are gradients of a loss multiplied by S: the norm
    is that of the gradients divided by S, and the one multiply unscales too.
    """
    op = sync.resolve_reduction(options.reduction, backend)
    nonfinite = options.nonfinite

    present = [i for i, g in enumerate(grads) if g is not None]
    sent, dtypes = wire.encode([grads[i] for i in present], sparse_as_dense=options.sparse_as_dense,
                               compression=options.compression)
    summed: List[Any] = [None] * len(sent)
    squares = []
    bucket_mb = backend.default_bucket_mb if options.bucket_mb == "auto" else options.bucket_mb
    for bucket in buckets.plan(sent, bucket_mb):              # reduce: one packed sum (or one per bucket)
        reduced = wire.decode(backend.all_reduce_sum([sent[i] for i in bucket]), [dtypes[i] for i in bucket])
        squares.append(backend.compute_once(sum_of_squares, reduced))            # (each bucket's share of the norm)
        for i, g in zip(bucket, reduced):
            summed[i] = g
    # A mean is the sum times 1/n (and 1/k over micro-batches); that factor rides on the clip multiply.
    to_mean = (1.0 / backend.num_replicas() if op == sync.MEAN else 1.0) / micro_batches
    if loss_scale is not None:
        to_mean = tf.constant(to_mean, tf.float32) / tf.cast(loss_scale, tf.float32)
    norm = backend.compute_once(_measure(len(squares)), squares + summed) * to_mean  # measure
    finite = tf.math.is_finite(norm)
    threshold = threshold_of(norm)                                               # decide
    scale = _on_nonfinite(nonfinite, clip_scale(norm, threshold), norm, finite)
    clipped = backend.compute_once(_scale(nonfinite == "skip"), [scale * to_mean] + summed)   # scale

    out: List[Optional[Any]] = [None] * len(grads)
    for i, g in zip(present, clipped):
        out[i] = g
    return ClipResult(
        grads=out,
        global_norm=norm,
        scale=scale,
        clipped=tf.logical_and(finite, norm > threshold),
        finite=finite,
    ), threshold


def _measure(buckets: int) -> Callable[[List[Any]], tf.Tensor]:
    """The norm from `[each bucket's sum of squares] + [the reduced gradients]` (the gradients for the rare rescaled pass)."""
    return lambda values: norm_from_squares(tf.add_n(values[:buckets]), values[buckets:])


def _scale(zero_on_zero_scale: bool) -> Callable[[List[Any]], List[Any]]:
    """`[scale] + gradients` -> the gradients times `scale`."""
    return lambda values: scale_gradients(values[1:], values[0], zero_on_zero_scale=zero_on_zero_scale)


def _on_nonfinite(nonfinite: str, scale: tf.Tensor, norm: tf.Tensor, finite: tf.Tensor) -> tf.Tensor:
    """The scale to apply: 0 to skip, an assertion to raise, NaN to propagate a non-finite norm."""
    if nonfinite == "raise":
        check = tf.debugging.Assert(finite, ["distclip: the global gradient norm is not finite: global_norm =", norm])
        with tf.control_dependencies([check]):
            return tf.identity(scale)
    fallback = 0.0 if nonfinite == "skip" else float("nan")
    return tf.where(finite, scale, tf.fill([], fallback))
