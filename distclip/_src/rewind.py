"""Rewind on a spike, or skip it: a spike detector, a ring of in-memory snapshots, and what each update does.

With `rewind=distclip.Rewind(every=K, keep=R, skip=M, ...)` a clip step decides,
from values identical on every replica (the synchronized norm, the loss when
given, its own counters), one action per update (`Rewinding.action`):

    stopped or skipping      -> SKIP        the update is not taken; the skip count goes down by one
    spike, ring not empty    -> REWIND      every variable the step owns goes back to the oldest snapshot,
                                            and the next M updates are skipped
                                (STOP       instead, if that rewind would be the (max_rewinds + 1)-th within
                                            max_rewinds_per updates: back to the oldest snapshot, then skip
                                            every update; the host raises `RewindLimitError`)
    norm not finite          -> NONFINITE   the usual lockstep skip
    else                     -> APPLY       snapshot first if K updates were applied since the last one
                                            (or the ring is empty), then the optimizer's own apply

A spike is, once the window holds `window` applied updates: a finite norm
(or loss) above `factor * mean` or `mean + zscore * std` of the window (or
with `two_sided`, `|x - mean| > zscore * std`), a non-finite loss, or
`nonfinite_in_row` non-finite norms in a row.

With `skip_spikes=distclip.SkipSpikes(...)` the same detector decides, and a
spike is only skipped (SKIP, on every replica together): nothing goes back and
no ring is made; the skipped spike's finite values enter the window (with a
rewind, spikes never do).

A snapshot holds every variable the step owns (the model's variables it
updates, the optimizer's variables: slots, `iterations`, a loss scale, and
distclip's state: threshold policy, skip count, noise scale) in one
`[keep, ...]` ring variable per variable, in the host memory of each process
(one copy per process, whatever its number of local replicas: the replicas
are identical), or with `placement="device"` beside the variables (one copy
per replica, where a step compiled by XLA on an accelerator can reach it).
The ring, the window and the counters are variables of the step (saved with
it), so a rewind's state survives a preemption.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Union

import tensorflow as tf

from distclip._src.checks import LARGEST, check_integer, check_number
from distclip._src import internals
from distclip._src.errors import ArgumentError
from distclip._src.lockstep import create_variables
from distclip._src.variables import identical_variable, read_value, tf_variable

APPLY, NONFINITE, SKIP, REWIND, STOP = range(5)
MAX_KEEP = 2 ** 16  # snapshots in a ring (each a copy of every variable the step owns)
MAX_WINDOW = 2 ** 20  # values in the detector's window, and rewinds counted toward the limit


@dataclasses.dataclass(frozen=True)
class Rewind:
    """How a clip step rewinds on a spike (pass as `rewind=` to `ClipStep` or `ClipOptimizer`).

    Every `every` applied updates the step copies its state into a ring of
    `keep` snapshots in host memory. On a spike every replica restores the
    oldest snapshot (between `(keep - 1) * every` and `keep * every` applied
    updates back) and skips the next `skip` updates, so the batches since the
    snapshot, the spike's and `skip` more are not learned from.

    Spike, once the window holds `window` applied updates (x the synchronized
    global norm, and the synchronized loss when `apply` is given one; mean and
    std, the population's, over the window's values):

        x > factor * mean    or    x > mean + zscore * std     (|x - mean| > zscore * std with two_sided)

    or a non-finite loss, or `nonfinite_in_row` non-finite norms in a row.
    To skip a spike without going back, use `distclip.SkipSpikes`.

    Args:
      every: K, 1 to 2**62, applied updates between snapshots.
      keep: R, 1 to 2**16, snapshots in the ring; memory per process is R times
        the step's variables (about 12 * R bytes per parameter with Adam in
        float32), refused when building if more than this machine's memory.
      skip: M, 0 to 2**62, updates skipped after each rewind.
      factor: a number > 1, or None: no ratio test.
      zscore: a number > 0, or None: no z-score test.
      window: how many applied updates the mean and std are taken over (2 to 2**20).
      two_sided: the z-score test on `|x - mean|` (OLMo-core's rule: an
        update far below the mean is a spike too) instead of `x - mean`.
      nonfinite_in_row: m, 1 to 2**62, or None: non-finite norms are skipped
        as usual and never cause a rewind.
      max_rewinds: how many rewinds (1 to 2**20) may happen within
        `max_rewinds_per` updates; the next one stops training
        (`distclip.RewindLimitError`).
      max_rewinds_per: the span, in updates (1 to 2**62), of that limit.
      placement: "host": the ring in the host memory of each process, one
        copy whatever its number of local replicas; "device": beside the
        variables, one copy per replica. A step compiled with XLA on an
        accelerator (`jit_compile=True`, TPUStrategy) reaches the device's
        memory only: use "device" there.
      lr_factor: f, a number in (0, 1), or None: after each rewind, the
        learning rate of the next `lr_updates` applied updates is multiplied
        by a factor that starts at f (see `lr_ramp`); give both or neither.
      lr_updates: K, 1 to 2**62, or None: how many applied updates the factor lasts.
      lr_ramp: "linear": the j-th applied update after the rewind (j = 1 .. K)
        has the factor f + (1 - f) * (j - 1) / K, back to 1 after K; "step":
        f for K updates, then 1. Only with `lr_factor`.
      reset_moments: after each rewind, the optimizer's moment slots (Adam's,
        AdamW's, Nadam's and Lamb's first and second moments, Adamax's, Lion's,
        RMSprop's, SGD's momentum) are set to zero (SPAM's reset); another
        optimizer is refused by name when the step is made.

    Raises:
      ArgumentError: a bad value, named with its range; no test at all
        (factor, zscore and nonfinite_in_row all None); or only one of
        `lr_factor` and `lr_updates`, or `lr_ramp` without them.
    """

    every: int
    keep: int = 2
    skip: int = 0
    factor: Optional[float] = 5.0
    zscore: Optional[float] = None
    window: int = 50
    nonfinite_in_row: Optional[int] = None
    max_rewinds: int = 3
    max_rewinds_per: int = 1000
    placement: str = "host"
    two_sided: bool = False
    lr_factor: Optional[float] = None
    lr_updates: Optional[int] = None
    lr_ramp: str = "linear"
    reset_moments: bool = False

    def __post_init__(self) -> None:
        if self.placement not in ("host", "device"):
            raise ArgumentError(f"placement must be 'host' or 'device'; got placement={self.placement!r}")
        if self.lr_ramp not in ("linear", "step"):
            raise ArgumentError(f"lr_ramp must be 'linear' or 'step'; got lr_ramp={self.lr_ramp!r}")
        if (self.lr_factor is None) != (self.lr_updates is None):
            raise ArgumentError(f"lr_factor and lr_updates go together (the factor, and for how many applied "
                                f"updates); got lr_factor={self.lr_factor!r} and lr_updates={self.lr_updates!r}")
        if self.lr_factor is None and self.lr_ramp != "linear":
            raise ArgumentError(f"lr_ramp={self.lr_ramp!r} shapes the learning-rate factor after a rewind; "
                                "without lr_factor nothing would use it")
        if self.lr_factor is not None:
            check_number("lr_factor", self.lr_factor, 0.0, 1.0, high_open=True)
            check_integer("lr_updates", self.lr_updates, 1, LARGEST)
        if not isinstance(self.reset_moments, bool):
            raise ArgumentError(f"reset_moments must be True or False; got reset_moments={self.reset_moments!r}")
        _check_detector(self.factor, self.zscore, self.window, self.two_sided)
        # keep, window and max_rewinds size variables ([keep, ...], [2, window], [max_rewinds]); the memory
        # the ring needs is checked against this machine's once the variables are known (`create_ring`).
        for name, low, high in (("every", 1, LARGEST), ("keep", 1, MAX_KEEP), ("skip", 0, LARGEST),
                                ("max_rewinds", 1, MAX_WINDOW), ("max_rewinds_per", 1, LARGEST)):
            check_integer(name, getattr(self, name), low, high)
        if self.nonfinite_in_row is not None:
            check_integer("nonfinite_in_row", self.nonfinite_in_row, 1)
        if self.factor is None and self.zscore is None and self.nonfinite_in_row is None:
            raise ArgumentError("Rewind needs a test: factor, zscore or nonfinite_in_row; got all three None")


@dataclasses.dataclass(frozen=True)
class SkipSpikes:
    """How a clip step skips a spike (pass as `skip_spikes=` to `ClipStep` or `ClipOptimizer`).

    The detector of `distclip.Rewind`, with another response: on a spike every
    replica skips that one update. It is not applied: variables, optimizer
    slots, `iterations`, a loss scale and the threshold policy's state stay as
    they were; the data stream goes on; nothing goes back. Spike, once the
    window holds `window` values (x the synchronized global norm, and the
    synchronized loss when `apply` is given one; population mean and std over
    the window's values):

        x > factor * mean    or    |x - mean| > zscore * std   (x - mean > zscore * std with two_sided=False)

    or a non-finite loss. A non-finite norm is skipped as always
    (`nonfinite="skip"`). A skipped spike's values enter the window (where
    both are finite), as in OLMo-core's `SkipStepOptimizer`, so that a lasting
    shift of the norm or the loss is skipped only until the window has seen
    it. The defaults are OLMo-core's (a z-score of 6 on either side over 128
    updates), except that the window must be full.

    Args:
      factor: a number > 1, or None: no ratio test.
      zscore: a number > 0, or None: no z-score test.
      window: how many applied updates the mean and std are taken over (2 to 2**20).
      two_sided: the z-score test on `|x - mean|` (an update far below the mean is skipped too).

    Raises:
      ArgumentError: a bad value, named with its range; or no test (factor and zscore both None).
    """

    factor: Optional[float] = None
    zscore: Optional[float] = 6.0
    window: int = 128
    two_sided: bool = True

    def __post_init__(self) -> None:
        _check_detector(self.factor, self.zscore, self.window, self.two_sided)
        if self.factor is None and self.zscore is None:
            raise ArgumentError("SkipSpikes needs a test: factor or zscore; got both None")


def _check_detector(factor: Optional[float], zscore: Optional[float], window: int, two_sided: bool) -> None:
    """The detector's arguments, which `Rewind` and `SkipSpikes` share."""
    check_integer("window", window, 2, MAX_WINDOW)
    for key, value, bound in (("factor", factor, 1.0), ("zscore", zscore, 0.0)):
        if value is not None:
            check_number(key, value, bound, rule=f"None or a finite number > {bound:g}")
    if not isinstance(two_sided, bool):
        raise ArgumentError(f"two_sided must be True or False; got two_sided={two_sided!r}")


class RewindEvent(NamedTuple):
    """The latest rewind, in updates counted from 1 since the start (applied, skipped or rewound alike).

    Fields:
      at: the update whose norm or loss was the spike (not applied).
      to: the update the restored snapshot was taken before (its state is the state before update `to`).
      skip_through: the last update skipped after it; updates `to` to `skip_through` are not learned from
        (`at` for a stopped one: every later update is skipped until the host stops).
      stopped: whether this was the rewind over the limit, after which training stops.
    """

    at: int
    to: int
    skip_through: int
    stopped: bool

    def line(self) -> str:
        """One line for a log: where the spike was, where it went back to.

        Returns:
          The line, in steps from 0 (update u is step u - 1), such as "step 130: spike: rewound to the
          snapshot before step 100, ...".
        """
        at, to, through = self.at - 1, self.to - 1, self.skip_through - 1
        if self.stopped:
            return f"step {at}: spike over the rewind limit: back to the snapshot before step {to}, training stopped"
        skipped = f", steps {at + 1} to {through} skipped" if through > at else ""
        return (f"step {at}: spike: rewound to the snapshot before step {to}{skipped}; "
                f"steps {to} to {through} not learned from")


class RewindLimitError(RuntimeError):
    """Spikes came back more often than `Rewind.max_rewinds` within `Rewind.max_rewinds_per` updates.

    The step's variables then hold the last good snapshot, and every later
    update is skipped; the message says where it was saved, if it was.
    """


class Rewinding(tf.Module):
    """The ring, the detector's window and the counters of one clip step (all saved with it).

    With a `SkipSpikes` config the ring stays empty and a spike is SKIP.
    """

    def __init__(self, config: Union[Rewind, SkipSpikes], name: str = "rewind"):
        super().__init__(name=name)
        self.config = config
        #: Whether a spike rewinds (`Rewind`) or is skipped (`SkipSpikes`).
        self.rewinds_on_spike = isinstance(config, Rewind)
        w = config.window
        r, limit = (config.keep, config.max_rewinds) if isinstance(config, Rewind) else (1, 1)
        with self.name_scope:
            self.updates = identical_variable("updates", (), tf.int64, 0)
            self.history = identical_variable("history", (2, w), tf.float32, 0.0)  # norms, losses
            self.history_count = identical_variable("history_count", (), tf.int64, 0)
            self.since_snapshot = identical_variable("since_snapshot", (), tf.int64, 0)
            self.ring_start = identical_variable("ring_start", (), tf.int64, 0)
            self.ring_size = identical_variable("ring_size", (), tf.int64, 0)
            self.snapshot_updates = identical_variable("snapshot_updates", (r,), tf.int64, 0)
            self.skip_left = identical_variable("skip_left", (), tf.int64, 0)
            self.stopped = identical_variable("stopped", (), tf.int64, 0)
            self.nonfinite_run = identical_variable("nonfinite_run", (), tf.int64, 0)
            self.rewinds = identical_variable("rewinds", (), tf.int64, 0)
            self.skipped = identical_variable("skipped", (), tf.int64, 0)
            self.recent = identical_variable("recent", (limit,), tf.int64, -(2 ** 62))
            self.latest = identical_variable("latest", (4,), tf.int64, 0)  # RewindEvent
            # Applied updates left at a lowered learning rate (only with Rewind.lr_factor).
            ramps = isinstance(config, Rewind) and config.lr_factor is not None
            self.lr_left = identical_variable("lr_left", (), tf.int64, 0) if ramps else None
        self.ring: List[Any] = []  # one [keep, ...] variable per owned variable, made by `create_ring`
        self._owned: List[Any] = []
        self._moments: List[Any] = []  # set to zero after a rewind, with Rewind.reset_moments

    def create_ring(self, strategy: tf.distribute.Strategy, owned: Sequence[Any], moments: Sequence[Any] = ()) -> None:
        """Makes one `[keep, *shape]` variable per variable of `owned` (where `placement` says), once; none when
        a spike is skipped. `moments`: the optimizer's moment slots, which a rewind with `reset_moments` zeroes."""
        if self.ring or not self.rewinds_on_spike:
            return
        self._moments = list(moments)
        config = self._rewind
        owned = _distinct(owned)
        check_ring_memory(config.keep, sum(tf.TensorShape(v.shape).num_elements() * tf.as_dtype(v.dtype).size
                                                for v in owned))

        def create():
            where = _on_host(strategy) if config.placement == "host" else strategy.scope()
            with where, self.name_scope:
                self.ring = [tf.Variable(tf.zeros((config.keep, *v.shape), tf.as_dtype(v.dtype)),
                                         trainable=False, name=f"snapshot_{i}",
                                         synchronization=tf.VariableSynchronization.ON_WRITE,
                                         aggregation=tf.VariableAggregation.NONE) for i, v in enumerate(owned)]

        create_variables(create)
        self._owned = owned

    @property
    def _rewind(self) -> Rewind:
        """The config, where a spike rewinds (the ring and the limit exist only then)."""
        assert isinstance(self.config, Rewind), "only a Rewind has a ring and a limit"
        return self.config

    def state(self) -> List[Any]:
        """Every variable of the rewind, in a fixed order: the counters, the window, then the ring (what a
        `tf.train.Checkpoint` of the step saves, and `ClipOptimizer` puts into a `.keras` file)."""
        return [self.updates, self.history, self.history_count, self.since_snapshot, self.ring_start,
                self.ring_size, self.snapshot_updates, self.skip_left, self.stopped, self.nonfinite_run,
                self.rewinds, self.skipped, self.recent, self.latest,
                *([] if self.lr_left is None else [self.lr_left]), *self.ring]

    def snapshot_bytes(self) -> int:
        """Bytes one snapshot takes (the ring holds `keep` of them)."""
        if not self.ring:
            return 0
        return sum(v.shape.num_elements() * v.dtype.size for v in self.ring) // self._rewind.keep

    def action(self, norm: tf.Tensor, finite: tf.Tensor, loss: Optional[tf.Tensor]) -> tf.Tensor:
        """This update's action (APPLY ... STOP), an int32 scalar identical on every replica; writes nothing."""
        c = self.config
        full = read_value(self.history_count) >= c.window
        spike = tf.logical_and(finite, tf.logical_and(full, self._beyond(norm, 0)))
        if loss is not None:
            loss = tf.cast(loss, tf.float32)
            loss_spike = tf.logical_or(tf.logical_not(tf.math.is_finite(loss)),
                                       tf.logical_and(full, self._beyond(loss, 1)))
            spike = tf.logical_or(spike, loss_spike)
        if not isinstance(c, Rewind):
            return tf.where(spike, SKIP, tf.where(finite, APPLY, NONFINITE))
        if c.nonfinite_in_row is not None:
            run = read_value(self.nonfinite_run) + 1
            spike = tf.logical_or(spike, tf.logical_and(tf.logical_not(finite), run >= c.nonfinite_in_row))
        spike = tf.logical_and(spike, read_value(self.ring_size) > 0)
        at = read_value(self.updates) + 1
        over_limit = tf.reduce_min(read_value(self.recent)) > at - c.max_rewinds_per
        skipping = tf.logical_or(read_value(self.stopped) > 0, read_value(self.skip_left) > 0)
        return tf.where(skipping, SKIP, tf.where(spike, tf.where(over_limit, STOP, REWIND),
                                                     tf.where(finite, APPLY, NONFINITE)))

    def _beyond(self, x: tf.Tensor, row: int) -> tf.Tensor:
        window = read_value(self.history)[row]
        mean = tf.reduce_mean(window)
        out = tf.constant(False)
        if self.config.factor is not None:
            out = tf.logical_or(out, x > self.config.factor * mean)
        if self.config.zscore is not None:
            distance = tf.abs(x - mean) if self.config.two_sided else x - mean
            out = tf.logical_or(out, distance > self.config.zscore * tf.math.reduce_std(window))
        return out

    def before_apply(self) -> None:
        """In APPLY, before the optimizer's apply: a snapshot if the ring is empty or `every` updates went by."""
        if not self.rewinds_on_spike:
            return
        due = tf.logical_or(read_value(self.ring_size) == 0, read_value(self.since_snapshot) >= self._rewind.every)
        tf.cond(due, self._snapshot, lambda: tf.constant(False))

    def _snapshot(self) -> tf.Tensor:
        r = self._rewind.keep
        start, size = read_value(self.ring_start), read_value(self.ring_size)
        slot = tf.math.floormod(start + size, r)
        for ring, v in zip(self.ring, self._owned, strict=True):
            ring.scatter_update(tf.IndexedSlices(read_value(v)[tf.newaxis], slot[tf.newaxis]))
        before = read_value(self.updates) + 1  # the snapshot holds the state before this update
        self.snapshot_updates.assign(tf.tensor_scatter_nd_update(
            read_value(self.snapshot_updates), slot[tf.newaxis, tf.newaxis], before[tf.newaxis]))
        full = size == r
        self.ring_start.assign(tf.where(full, tf.math.floormod(start + 1, r), start))
        self.ring_size.assign(tf.where(full, size, size + 1))
        self.since_snapshot.assign(tf.zeros([], tf.int64))
        return tf.constant(True)

    def lr_factor(self) -> Optional[tf.Tensor]:
        """In APPLY: this update's learning-rate factor (float32; 1 once `lr_updates` applied updates went by
        since the latest rewind), or None without `Rewind.lr_factor`.

            linear:  f + (1 - f) * (j - 1) / K   for the j-th applied update after the rewind, j = 1 .. K
            step:    f
        """
        if self.lr_left is None:
            return None
        c = self._rewind
        assert c.lr_factor is not None and c.lr_updates is not None
        left = read_value(self.lr_left)
        low = tf.constant(c.lr_factor, tf.float32)
        if c.lr_ramp == "linear":
            done = tf.cast(c.lr_updates - left, tf.float32)  # j - 1
            low = low + tf.constant(1.0 - c.lr_factor, tf.float32) * done / tf.constant(c.lr_updates, tf.float32)
        return tf.where(left > 0, low, tf.ones([], tf.float32))

    def _remember(self, norm: tf.Tensor, loss: Optional[tf.Tensor]) -> None:
        """The window takes in a norm (and loss), in place of its oldest."""
        w = self.config.window
        count = read_value(self.history_count)
        slot = tf.math.floormod(count, w)
        values = tf.stack([norm, tf.zeros([]) if loss is None else tf.cast(loss, tf.float32)])
        self.history.assign(tf.tensor_scatter_nd_update(
            read_value(self.history), tf.stack([tf.constant([0, 1], tf.int64), tf.fill([2], slot)], axis=1), values))
        self.history_count.assign(count + 1)

    def after_apply(self, norm: tf.Tensor, loss: Optional[tf.Tensor]) -> None:
        """In APPLY, after the update: the window takes in its norm (and loss); counters move on."""
        self._remember(norm, loss)
        self.since_snapshot.assign(read_value(self.since_snapshot) + 1)
        self.nonfinite_run.assign(tf.zeros([], tf.int64))
        if self.lr_left is not None:
            self.lr_left.assign(tf.maximum(read_value(self.lr_left) - 1, 0))
        self._count()

    def after_nonfinite(self) -> None:
        """In NONFINITE: one more non-finite norm in a row."""
        self.nonfinite_run.assign(read_value(self.nonfinite_run) + 1)
        self._count()

    def skip_one(self, norm: tf.Tensor, loss: Optional[tf.Tensor]) -> None:
        """In SKIP: one skipped update (the skip count goes down, unless stopped). A skipped spike's norm and
        loss enter the window where both are finite (`SkipSpikes`), so that a lasting shift is learned."""
        if not self.rewinds_on_spike:
            finite = tf.math.is_finite(norm)
            if loss is not None:
                finite = tf.logical_and(finite, tf.math.is_finite(tf.cast(loss, tf.float32)))

            def remember() -> tf.Tensor:
                self._remember(norm, loss)
                return tf.constant(True)

            tf.cond(finite, remember, lambda: tf.constant(False))
        self.skip_left.assign(tf.where(read_value(self.stopped) > 0, read_value(self.skip_left),
                                       tf.maximum(read_value(self.skip_left) - 1, 0)))
        self.skipped.assign(read_value(self.skipped) + 1)
        self._count()

    def rewind(self, stop: bool) -> None:
        """In REWIND (or STOP): every owned variable back to the oldest snapshot (the moment slots then to zero,
        with `reset_moments`; the learning-rate factor restarts, with `lr_factor`); then skip M (or everything)."""
        c = self._rewind
        start = read_value(self.ring_start)
        for ring, v in zip(self.ring, self._owned, strict=True):
            tf_variable(v).assign(tf.gather(ring, start))
        for v in self._moments:  # empty unless reset_moments
            tf_variable(v).assign(tf.zeros(v.shape, v.dtype))
        if self.lr_left is not None:
            self.lr_left.assign(tf.constant(c.lr_updates, tf.int64))
        at = read_value(self.updates) + 1
        to = tf.gather(read_value(self.snapshot_updates), start)
        self.latest.assign(tf.stack([at, to, at if stop else at + c.skip, tf.constant(int(stop), tf.int64)]))
        self.rewinds.assign(read_value(self.rewinds) + 1)
        self.skipped.assign(read_value(self.skipped) + 1)
        if stop:
            self.stopped.assign(tf.ones([], tf.int64))
        else:
            self.skip_left.assign(tf.constant(c.skip, tf.int64))
            recent = read_value(self.recent)
            self.recent.assign(tf.concat([recent[1:], at[tf.newaxis]], axis=0))
        self.ring_size.assign(tf.ones([], tf.int64))
        self.since_snapshot.assign(tf.zeros([], tf.int64))
        self.nonfinite_run.assign(tf.zeros([], tf.int64))
        self._count()

    def _count(self) -> None:
        self.updates.assign(read_value(self.updates) + 1)

    def latest_event(self) -> Optional[RewindEvent]:
        """The latest rewind (read eagerly), or None before the first."""
        if int(read_value(self.rewinds).numpy()) == 0:
            return None
        at, to, through, stopped = (int(x) for x in read_value(self.latest).numpy())
        return RewindEvent(at=at, to=to, skip_through=through, stopped=bool(stopped))

    def check_limit(self, save: Optional[Callable[[], Optional[str]]] = None) -> None:
        """Raises `RewindLimitError` if the limit was hit (read eagerly), after `save()` (which returns the path
        it wrote, or None where another process writes it).

        Before `save()` the stop and the limit's count are cleared, so that the
        saved state resumes training (with the rewind budget of a fresh start).
        """
        if not int(read_value(self.stopped).numpy()):
            return
        event = self.latest_event()
        assert event is not None
        self.stopped.assign(tf.zeros([], tf.int64))
        c = self._rewind
        self.recent.assign(tf.fill([c.max_rewinds], tf.constant(-(2 ** 62), tf.int64)))
        path = save() if save is not None else None
        where = (f"saved to {path}" if path else "not saved (nothing to save it with was given)" if save is None
                 else "saved by another process (rank 0 names where)")
        raise RewindLimitError(
            f"rewind limit hit: a spike at update {event.at} would be rewind {c.max_rewinds + 1} within "
            f"{c.max_rewinds_per} updates (max_rewinds={c.max_rewinds}); training stopped. The variables hold the "
            f"last good snapshot, taken before update {event.to}, {where}. Look at the data around updates "
            f"{event.to} to {event.at}, or lower the learning rate, then resume from it")


def check_ring_memory(keep: int, snapshot: int) -> None:
    """Raises ArgumentError if `keep` snapshots of `snapshot` bytes exceed this machine's physical memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform: nothing to compare with
        return
    if keep * snapshot > memory:
        raise ArgumentError(
            f"keep={keep} snapshots of {snapshot:,} bytes each (every variable the step owns) need "
            f"{keep * snapshot / 2 ** 30:.1f} GiB for the ring, more than this machine's "
            f"{memory / 2 ** 30:.1f} GiB of memory; the most that fits is keep={max(memory // max(snapshot, 1), 0)}")


def owned_variables(trainable: Sequence[Any], optimizer_variables: Sequence[Any],
                    state: Sequence[Any]) -> List[Any]:
    """What a snapshot holds: the variables the step updates, the optimizer's, and distclip's saved state."""
    return _distinct([*trainable, *optimizer_variables, *state])


def _distinct(variables: Sequence[Any]) -> List[Any]:
    seen, out = set(), []
    for v in variables:
        key = id(tf_variable(v))
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _on_host(strategy: tf.distribute.Strategy) -> Any:
    """Where the ring goes: the host of this process (one plain variable, not one per replica)."""
    if not tf.distribute.has_strategy():
        return tf.device("/CPU:0")
    # The strategy's own way to make a variable on one device (a `SingleDevice`, as for numpy input).
    host = internals.host_input_device(strategy)
    if host is None:
        return contextlib.nullcontext()
    return tf.variable_creator_scope(lambda next_creator, **kwargs: next_creator(**kwargs, colocate_with=host))


