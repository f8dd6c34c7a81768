"""`sync_and_clip`: synchronize across replicas, then clip by the global norm; `ClipResult`, what it returns."""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from distclip._src import sync
from distclip._src.agc import AGC, Axes, unit_axes, unit_factors, unit_squares
from distclip._src.checks import check_gradients
from distclip._src.errors import ArgumentError
from distclip._src.groups import ClipGroups, measure_groups, norm_after_groups
from distclip._src.nonfinite import Nonfinite, guarded_scale, nonfinite_variables, read_report, replica_report, skips
from distclip._src.norm import clip_scale, norm_from_squares, scale_gradients, squared_norm
from distclip._src.options import BucketMB, StepOptions
from distclip._src.policies import Policy
from distclip._src.sync import BackendName, Reduction, buckets, wire
from distclip._src.sync.wire import Compression
from distclip._src.threshold import ClipNorm, resolve_clip_norm


class ClipResult(NamedTuple):
    """What `sync_and_clip` (and `ClipStep.apply`) computed, usable inside `tf.function`.

    Fields:
      grads: the synchronized, clipped gradients, in the input order and length;
        `None` entries stay `None`, `tf.IndexedSlices` stay sparse.
      global_norm: float32 scalar, `sqrt(sum_i ||g_i||_2^2)` over the synchronized
        gradients before clipping (the L2 norm of all of them as one vector, in the
        gradients' own units); with `agc`, after the unit-wise clip and before the
        global one. Identical on every replica.
      scale: float32 scalar actually multiplied into the gradients,
        `min(1, clip_norm / global_norm)`: at most 1. On a step skipped for a
        non-finite norm it is 0 (nothing is applied); with `nonfinite="propagate"`
        it is NaN, as in `tf.clip_by_global_norm`.
      clipped: bool scalar, `global_norm > clip_norm` on a finite step.
      finite: bool scalar, whether `global_norm` is finite.
      nonfinite_replicas: bool `[num_replicas]`: entry r is True where replica
        r's own gradients (before the all-reduce) held an inf or a NaN.
        Replicas are numbered as `replica_id_in_sync_group` (worker-major
        under MultiWorkerMirroredStrategy), or by Horovod rank. Identical on
        every replica; all False on a finite step.
      nonfinite_variables: bool `[len(grads)]`: entry i is True where the
        synchronized gradient of variable i held an inf or a NaN.
      variable_norms: float32 `[len(grads)]`, `||g_i||_2` of each synchronized
        gradient before clipping (with `agc`, after the unit-wise clip), in the units of `global_norm` (0 for a
        `None` gradient), with `variable_norms=True`; otherwise None.
      noise: the gradient noise scale estimates (`distclip.NoiseEstimate`)
        with `noise_scale=` on `ClipStep` or `ClipOptimizer`; otherwise None.
      loss: float32 scalar, the replicas' losses reduced as the gradients are
        (sum or mean; the mean over micro-batches), when `apply` was given a
        `loss`; otherwise None. Identical on every replica.
      group_norms: float32 `[len(names)]` with `clip_norm=distclip.ClipGroups(...)`: each group's norm
        `n_k` before its own clip, in the order of `ClipGroups.names` (the default group last); otherwise
        None. `global_norm` is then the norm after the groups' clip, and `clipped` is True also where a
        group's norm exceeded its threshold.
      group_scales: float32 `[len(names)]`, each group's factor `min(1, c_k / n_k)`; a gradient of group k
        is multiplied by `group_scales[k] * scale`. None without groups.
    """

    grads: List[Optional[Any]]
    global_norm: tf.Tensor
    scale: tf.Tensor
    clipped: tf.Tensor
    finite: tf.Tensor
    nonfinite_replicas: tf.Tensor
    nonfinite_variables: tf.Tensor
    variable_norms: Optional[tf.Tensor] = None
    noise: Optional[Any] = None
    loss: Optional[tf.Tensor] = None
    group_norms: Optional[tf.Tensor] = None
    group_scales: Optional[tf.Tensor] = None


class GroupPlan(NamedTuple):
    """`ClipGroups` as one step uses it: each gradient's group (an index into `ClipGroups.names`), and the
    groups' thresholds for this step, float32 `[len(names)]`."""

    members: List[int]
    thresholds: tf.Tensor


def sync_and_clip(
    grads: Sequence[Optional[Any]],
    clip_norm: ClipNorm,
    *,
    nonfinite: Nonfinite = "skip",
    reduction: Reduction = "auto",
    backend: BackendName = "auto",
    step: Optional[tf.Tensor] = None,
    sparse_as_dense: bool = False,
    compression: Compression = None,
    bucket_mb: BucketMB = "auto",
    variable_norms: bool = False,
) -> ClipResult:
    """All-reduce `grads` across replicas, then clip them by their global L2 norm.

    With `g_i` the gradients after the all-reduce (identical on every replica):

        global_norm = sqrt(sum_i ||g_i||_2^2)            (accumulated in float32)
        scale       = min(1, clip_norm / global_norm)
        g_i        <- g_i * scale

    which is `tf.clip_by_global_norm` applied to the synchronized gradients, so
    the result equals single-device training on the global batch. Under
    `reduction="mean"` the replicas' gradients are summed and the 1/n is part
    of the one multiply by `scale / n`. Must run in a replica context: inside
    `strategy.run`, or with no strategy.

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
      backend: what synchronizes the gradients: "auto" (found from the
        context), "tf_distribute", "horovod" or "none" (taken as synchronized).
      step: the step number, needed only when `clip_norm` is a callable.
      sparse_as_dense: send `tf.IndexedSlices` as dense tensors in the packed
        all-reduce instead of all-gathering them.
      compression: None or "fp16": float32/float64 gradients travel as float16;
        the norm is computed on the decompressed values.
      bucket_mb: "auto" (25 MB buckets under Horovod; one packed all-reduce
        under tf.distribute), None (one packed all-reduce after the backward
        pass), or buckets of at most this many megabytes, last layers first,
        each sent as soon as it is ready.
      variable_norms: also return each synchronized gradient's own L2 norm
        (`ClipResult.variable_norms`).

    Returns:
      The synchronized, clipped gradients with the norm and scale, and which
      replicas and variables were non-finite (`ClipResult`).

    Raises:
      ArgumentError: a bad argument, named with its value.
      ContextError: called in a cross-replica context, or with a backend the
        context cannot run.
    """
    options = StepOptions(nonfinite=nonfinite, reduction=reduction, backend=backend, sparse_as_dense=sparse_as_dense,
                          compression=compression, bucket_mb=bucket_mb, variable_norms=variable_norms)
    grads = check_gradients(grads)
    if isinstance(clip_norm, ClipGroups):
        raise ArgumentError(
            f"clip_norm={clip_norm!r} sorts variables into groups, and sync_and_clip is not given the variables: "
            "use distclip.ClipStep or distclip.keras.ClipOptimizer")
    if isinstance(clip_norm, Policy):
        raise ArgumentError(
            f"clip_norm={clip_norm!r} is a policy, which keeps state from step to step: use "
            "distclip.ClipStep or distclip.keras.ClipOptimizer, which hold it in variables"
        )
    threshold = resolve_clip_norm(clip_norm, step)  # checks clip_norm
    sync.check_replica_context("sync_and_clip")
    result, _, _ = clip_synchronized(grads, sync.select(options.backend), lambda norm: threshold, options)
    return result


def clip_synchronized(
    grads: List[Optional[Any]],
    backend: sync.Backend,
    threshold_of: Callable[[tf.Tensor], tf.Tensor],
    options: StepOptions,
    *,
    micro_batches: int = 1,
    loss_scale: Optional[tf.Tensor] = None,
    loss: Optional[tf.Tensor] = None,
    agc: Optional[AGC] = None,
    weights: Optional[Sequence[Any]] = None,
    groups: Optional[GroupPlan] = None,
) -> Tuple[ClipResult, tf.Tensor, Optional[tf.Tensor]]:
    """`sync_and_clip`'s reduce, measure, decide and scale, with the threshold a function of the norm.

    `grads` must have been checked (`check_gradients`); `backend` reduces them.
    The sums arrive identical on every replica, and each replica measures and
    scales its own copy. With `micro_batches=k` they are sums over k
    micro-batches and their mean is what is clipped; with `loss_scale` S they
    are gradients of a loss multiplied by S, whose norm is that of the
    gradients divided by S. Both factors, and a mean's 1/n, ride on the one
    multiply.

    Each replica also sums the squares of its own gradients (one pass), and
    `num_replicas + 1` float elements ride on the last packed collective: its
    non-finite flag at its own index, and that sum (`distclip._src.nonfinite.replica_report`).
    A `loss` (this replica's, unscaled; a sum over micro-batches) rides there too, as one more element.

    With `agc` (and `weights`, the variables of `grads`), each unit is first
    clipped against its weights (`distclip._src.agc`): the norm measured, the
    threshold decided on and the per-variable norms are those of what AGC
    leaves, and its factors ride on the same multiply.

    With `groups` (each gradient's group and the groups' thresholds), each
    group is first clipped by its own norm (`distclip._src.groups`), after
    AGC: the norm measured and decided on is the norm after the groups' clip,
    and their factors ride on the same multiply.

    Returns:
      The result; the threshold used; `sum_r ||f g_r||_2^2` over the
      replicas' own gradients g_r, with f the factor from the sums to the
      clipped gradients (so that `f g_r` is one term of the mean `global_norm` measures); None where the
      report travelled as float16 or bfloat16 (float16 gradients on the wire), too narrow for it.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    weights = [] if weights is None else [weights[i] for i in present]
    units = None if agc is None else [unit_axes(w) for w in weights]
    r = _reduce([grads[i] for i in present], backend, options, loss, units)                          # reduce
    op = sync.resolve_reduction(options.reduction, backend)
    to_mean = _to_mean(op, backend, micro_batches, loss_scale)
    squares, factors = r.squares, None
    if agc is None:
        total = tf.add_n(squares) if squares else tf.zeros([], tf.float32)
        norm = norm_from_squares(total, r.summed) * to_mean                                           # measure
    else:
        total = tf.add_n([tf.reduce_sum(u) for u in r.squares])
        factors, squares = unit_factors(r.squares, weights, agc, to_mean)
        norm = tf.sqrt(tf.add_n(squares)) * to_mean
    group_norms = group_scales = None
    if groups is not None:                                                        # (groups) each group's own clip
        members = [groups.members[i] for i in present]
        group_norms = measure_groups(squares, r.summed, members, groups.thresholds.shape[0], to_mean,
                                     rescale=agc is None)
        group_scales = clip_scale(group_norms, groups.thresholds)
        norm = norm_after_groups(group_norms, group_scales)
        by_group = [group_scales[k] for k in members]
        factors = by_group if factors is None else [a * s for a, s in zip(factors, by_group, strict=True)]
    finite = tf.math.is_finite(norm)
    threshold = threshold_of(norm)                                                                     # decide
    scale = guarded_scale(options.nonfinite, clip_scale(norm, threshold), norm, finite)
    clipped = scale_gradients(r.summed, scale * to_mean, zero_on_zero_scale=skips(options.nonfinite),  # scale
                              factors=None if factors is None else [tf.where(finite, a, 0.0) for a in factors])

    out_grads: List[Optional[Any]] = [None] * len(grads)
    for i, g in zip(present, clipped, strict=True):
        out_grads[i] = g
    over = norm > threshold
    if groups is not None:
        over = tf.logical_or(over, tf.reduce_any(group_norms > groups.thresholds))
    result = ClipResult(
        grads=out_grads, global_norm=norm, scale=scale, clipped=tf.logical_and(finite, over),
        finite=finite, nonfinite_replicas=tf.logical_and(tf.logical_not(finite), r.flags),
        nonfinite_variables=_scatter(nonfinite_variables(r.summed, total), present, len(grads), False),
        variable_norms=_variable_norms(squares, to_mean, present, len(grads)) if options.variable_norms else None,
        loss=None if loss is None else r.loss_sum * _to_mean(op, backend, micro_batches, None),
        group_norms=group_norms, group_scales=group_scales)
    precise = r.wire_dtype in (tf.float32, tf.float64)  # a float16 sum of squares overflows at 65504
    return result, threshold, r.local_squares * to_mean * to_mean if precise else None


class _Reduced(NamedTuple):
    """What the packed all-reduce brought back: the summed gradients and each one's squared norm (per unit
    with AGC), and the replicas' report (non-finite flags, the sum of their own squares, the loss's sum)."""

    summed: List[Any]
    squares: List[Any]
    flags: tf.Tensor
    local_squares: tf.Tensor
    loss_sum: tf.Tensor
    wire_dtype: tf.DType


def _reduce(local: List[Any], backend: sync.Backend, options: StepOptions, loss: Optional[tf.Tensor],
            units: Optional[List[Axes]] = None) -> _Reduced:
    """Sums `local` over replicas in one packed collective per bucket; the report rides on the last one.

    Each sum is measured as it arrives: its squared norm, or with `units` (AGC's axes per gradient) its
    `unit_squares`, so that AGC reads each gradient once to measure it."""
    n = backend.num_replicas()
    sent, dtypes = wire.encode(local, sparse_as_dense=options.sparse_as_dense, compression=options.compression)
    # The report travels in the gradients' dtype: a strategy packs one buffer of one dtype per collective.
    dense = {g.dtype for g in sent if isinstance(g, tf.Tensor)}
    wire_dtype = dense.pop() if len(dense) == 1 and next(iter(dense)).is_floating else tf.float32
    report = replica_report(local, backend.replica_index(), n, wire_dtype)
    if loss is not None:
        report = tf.concat([report, tf.cast(tf.reshape(loss, [1]), wire_dtype)], axis=0)
    summed: List[Any] = [None] * len(sent)
    squares: List[Any] = [None] * len(sent)
    bucket_mb = backend.default_bucket_mb if options.bucket_mb == "auto" else options.bucket_mb
    plan = buckets.plan(sent, bucket_mb)
    for b, bucket in enumerate(plan):
        extra = [report] if b == len(plan) - 1 else []  # in the last collective, which waits for every gradient
        out = backend.all_reduce_sum([sent[i] for i in bucket] + extra)
        reduced = wire.decode(out[:len(bucket)], [dtypes[i] for i in bucket])
        for i, g in zip(bucket, reduced, strict=True):  # each bucket's share of the norm, as soon as it arrives
            summed[i], squares[i] = g, squared_norm(g) if units is None else unit_squares(g, units[i])
        if extra:
            flags, local_squares = read_report(out[-1], n)
            loss_sum = tf.cast(out[-1][-1], tf.float32)
    return _Reduced(summed, squares, flags, local_squares, loss_sum, wire_dtype)


def _variable_norms(squares: List[tf.Tensor], to_mean: Any, present: List[int], size: int) -> tf.Tensor:
    """`||g_i||_2` per variable in the units of `global_norm` (0 where a gradient is `None`)."""
    if not squares:
        return tf.zeros([size], tf.float32)
    return _scatter(tf.sqrt(tf.stack(squares)) * to_mean, present, size, 0.0)


def _scatter(values: tf.Tensor, present: List[int], size: int, fill: Any) -> tf.Tensor:
    """`values` (one per present gradient) at their indices among `size`, `fill` elsewhere."""
    if len(present) == size:
        return values
    out = tf.fill([size], tf.constant(fill, values.dtype))
    if not present:
        return out
    return tf.tensor_scatter_nd_update(out, tf.constant([[i] for i in present]), values)


def _to_mean(op: str, backend: sync.Backend, micro_batches: int, loss_scale: Optional[tf.Tensor]) -> Any:
    """The factor from the reduced sums to the gradients that are clipped: 1/n for a mean over n replicas,
    1/k over k micro-batches, 1/S under a loss scale S."""
    factor = (1.0 / backend.num_replicas() if op == sync.MEAN else 1.0) / micro_batches
    if loss_scale is None:
        return factor
    return tf.constant(factor, tf.float32) / tf.cast(loss_scale, tf.float32)
