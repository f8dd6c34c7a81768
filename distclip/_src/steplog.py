"""Per-step clip metrics to a CSV file and TensorBoard: what `ClipLogger` and `distclip train` write.

One row per update, in `metrics.csv` with the columns of `COLUMNS`:
`step` (from 0), `loss`, `global_norm` (synchronized, before clipping, in the
gradients' units), `scale` (the clip factor applied), `clip_norm` (the
threshold used; inf for `clip_norm=None`), `clipped` (1: applied, clipped),
`skipped` (1: not applied, whatever the reason) and `action` (`ACTIONS`:
applied, nonfinite, skipped, rewound, stopped or spike_skipped). The same scalars go to
TensorBoard event files under `tensorboard/`. (A metrics.csv of distclip 0.2.0
has no `action`; a resumed run adds it to the kept rows.)

Besides, as they happen: each non-finite update to `nonfinite.csv` (one row
per replica whose own gradients were non-finite: step, skipped, replica,
worker, host, device, and the variables, `;`-separated) and as a TensorBoard
text `nonfinite`; per-layer norms to `layer_norms.csv` (step, layer, norm)
and TensorBoard (`layer_norm/<layer>` scalars, a `variable_norms`
histogram); the noise scale to TensorBoard (`noise/...`); each rewind to
`rewinds.csv` (step of the spike, `to_step` the snapshot was taken before,
`skip_through_step` or "stopped" for the rewind over the limit, `stopped`)
and as a TensorBoard text `rewind`; with `ClipGroups`, every update's
groups to `group_norms.csv` (step, group, norm before the group's clip,
clip_norm, scale) and TensorBoard (`group_norm/<group>`, `group_scale/<group>`). A resumed log keeps the earlier rows of
each file, and reads the earlier events back (`earlier_nonfinite`,
`earlier_rewinds`) so that a run's summary covers the whole run.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from typing import IO, Any, Dict, List, Optional, Sequence

import tensorflow as tf

from distclip._src.attribution import NonfiniteUpdate, ReplicaPlace
from distclip._src.errors import ContextError
from distclip._src.rewind import RewindEvent

COLUMNS = ("step", "loss", "global_norm", "scale", "clip_norm", "clipped", "skipped", "action")
#: What an update did (the `action` column): applied; skipped for a non-finite norm (or applied as it was, with
#: nonfinite="propagate"); skipped after a rewind; rewound on a spike; stopped at the rewind limit; skipped as a
#: spike (`skip_spikes`).
ACTIONS = ("applied", "nonfinite", "skipped", "rewound", "stopped", "spike_skipped")
NONFINITE_COLUMNS = ("step", "skipped", "replica", "worker", "host", "device", "variables")
LAYER_COLUMNS = ("step", "layer", "norm")
REWIND_COLUMNS = ("step", "to_step", "skip_through_step", "stopped")
GROUP_COLUMNS = ("step", "group", "norm", "clip_norm", "scale")


def write_atomically(path: str, text: str) -> None:
    """Replaces `path` with `text` so that a kill at any moment leaves either the old file or the whole new one:
    a temporary file beside it, flushed and fsynced, then renamed over it."""
    partial = path + ".partial"
    with open(partial, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def require_tensorboard(what: str) -> None:
    """Raises ContextError, saying what to install, when `tf.summary` has no TensorBoard to write with.

    TensorFlow 2.21's wheel no longer brings TensorBoard; without it `tf.summary.scalar` fails at the first
    write, in the middle of training. This check runs before anything is written.
    """
    if importlib.util.find_spec("tensorboard") is None:
        raise ContextError(f"{what} writes TensorBoard event files, which needs the tensorboard package: "
                           "pip install tensorboard")


class StepLog:
    """Per-step metrics to `metrics.csv` and TensorBoard event files under `out/tensorboard`."""

    def __init__(self, out: str, first_step: Optional[int] = None):
        """`first_step`: continue a resumed run's metrics.csv, keeping the rows of the steps before it.

        The kept rows are rewritten atomically (a temporary file, flushed and fsynced, then renamed over
        metrics.csv) before this returns, so a kill at any later moment leaves them all on disk.
        """
        require_tensorboard("StepLog")
        os.makedirs(out, exist_ok=True)
        self.csv_path = os.path.join(out, "metrics.csv")
        kept: List[List[str]] = []  # the earlier rows, exactly as written
        if first_step is not None and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))[1:first_step + 1]
            # Rows after the checkpoint (and a line cut short by a kill) go; those before it were flushed whole.
            # A row of distclip 0.2.0 (no action) gets the action its `skipped` meant then.
            kept = [r + [ACTIONS[1] if r[6] == "1" else ACTIONS[0]] if len(r) == len(COLUMNS) - 1 else r
                    for i, r in enumerate(rows) if len(COLUMNS) - 1 <= len(r) <= len(COLUMNS) and r[0] == str(i)]
            kept = [r for r in kept if r[-1] in ACTIONS]
        self.rows: List[Dict[str, Any]] = [_row(r) for r in kept]
        text = io.StringIO(newline="")
        csv.writer(text).writerows([COLUMNS, *kept])
        write_atomically(self.csv_path, text.getvalue())
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.writer(self._file)
        self._tb = tf.summary.create_file_writer(os.path.join(out, "tensorboard"))
        self._nonfinite = _EventFile(os.path.join(out, "nonfinite.csv"), NONFINITE_COLUMNS, first_step)
        self._layers = _EventFile(os.path.join(out, "layer_norms.csv"), LAYER_COLUMNS, first_step)
        self._rewinds = _EventFile(os.path.join(out, "rewinds.csv"), REWIND_COLUMNS, first_step)
        self._groups = _EventFile(os.path.join(out, "group_norms.csv"), GROUP_COLUMNS, first_step)

    def write(self, row: Dict[str, Any]) -> None:
        """One update's row (the keys of `COLUMNS`; `action` one of `ACTIONS`)."""
        if row["action"] not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}; got {row['action']!r}")
        self.rows.append(row)
        self._csv.writerow([row[c] for c in COLUMNS])
        with self._tb.as_default(step=int(row["step"])):
            for name in ("loss", "global_norm", "scale", "clip_norm", "skipped"):
                if math.isfinite(row[name]):
                    tf.summary.scalar(name, row[name])

    def write_nonfinite(self, record: NonfiniteUpdate) -> None:
        """A non-finite update (`distclip.NonfiniteUpdate`): its rows, and its line as TensorBoard text."""
        variables = ";".join(record.variables)
        for place in [tuple(p) for p in record.replicas] or [("", "", "", "")]:
            self._nonfinite.write([record.step, int(record.skipped), *place, variables])
        with self._tb.as_default(step=record.step):
            tf.summary.text("nonfinite", record.line())

    def write_rewind(self, event: RewindEvent) -> None:
        """A rewind (updates counted from 1) as a row in steps from 0, and its line as TensorBoard text."""
        self._rewinds.write([event.at - 1, event.to - 1, "stopped" if event.stopped else event.skip_through - 1,
                             int(event.stopped)])
        with self._tb.as_default(step=event.at - 1):
            tf.summary.text("rewind", event.line())

    def earlier_nonfinite(self) -> List[NonfiniteUpdate]:
        """The non-finite updates of the run before a resume (from the kept rows of nonfinite.csv)."""
        records: Dict[int, NonfiniteUpdate] = {}
        for r in self._nonfinite.kept:
            step, skipped, replica, worker, host, device, variables = r
            record = records.setdefault(int(step), NonfiniteUpdate(int(step), skipped == "1", [],
                                                             variables.split(";") if variables else []))
            if replica != "":
                record.replicas.append(ReplicaPlace(int(replica), int(worker), host, device))
        return [records[s] for s in sorted(records)]

    def earlier_rewinds(self) -> List[RewindEvent]:
        """The rewinds of the run before a resume (from the kept rows of rewinds.csv), in updates from 1."""
        return [RewindEvent(at=int(step) + 1, to=int(to) + 1,
                            skip_through=int(step) + 1 if stopped == "1" else int(through) + 1, stopped=stopped == "1")
                for step, to, through, stopped in self._rewinds.kept]

    def write_norms(self, step: int, names: Sequence[str], norms: Sequence[float]) -> None:
        """Per-variable norms of one update, written per layer (`layer_norms`)."""
        layers = layer_norms(names, norms)
        for layer, norm in layers.items():
            self._layers.write([step, layer, norm])
        with self._tb.as_default(step=step):
            for layer, norm in layers.items():
                tf.summary.scalar(f"layer_norm/{layer}", norm)
            finite = [n for n in norms if math.isfinite(n)]
            if finite:
                tf.summary.histogram("variable_norms", finite)

    def write_groups(self, step: int, names: Sequence[str], norms: Sequence[float], clip_norms: Sequence[float],
                     scales: Sequence[float]) -> None:
        """Each group's norm (before its own clip), threshold and scale in one update."""
        for row in zip(names, norms, clip_norms, scales, strict=True):
            self._groups.write([step, *row])
        with self._tb.as_default(step=step):
            for name, norm, scale in zip(names, norms, scales, strict=True):
                for tag, value in (("group_norm", norm), ("group_scale", scale)):
                    if math.isfinite(value):
                        tf.summary.scalar(f"{tag}/{name}", value)

    def write_noise(self, step: int, estimate: Any) -> None:
        """The noise scale's estimates (`distclip.NoiseEstimate` of floats) after an update."""
        with self._tb.as_default(step=step):
            for name in estimate._fields:
                value = float(getattr(estimate, name))
                if math.isfinite(value):
                    tf.summary.scalar(f"noise/{name}", value)

    def flush(self) -> None:
        """Puts every row written so far on disk (before each checkpoint: a resume keeps them)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._nonfinite.flush()
        self._layers.flush()
        self._rewinds.flush()
        self._groups.flush()
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._nonfinite.close()
        self._layers.close()
        self._rewinds.close()
        self._groups.close()
        self._tb.close()


def _row(values: Sequence[str]) -> Dict[str, Any]:
    """A metrics.csv row as written: numbers as floats, the action as its name."""
    return {c: v if c == "action" else float(v) for c, v in zip(COLUMNS, values, strict=True)}


def layer_of(name: str) -> str:
    """The layer a variable belongs to: its path without the last part ("dense_2/kernel" -> "dense_2")."""
    return name.rsplit("/", 1)[0] if "/" in name else name


def layer_norms(names: Sequence[str], norms: Sequence[float]) -> Dict[str, float]:
    """Per-layer norms, `sqrt(sum ||g_v||^2)` over each layer's variables, in the order layers first appear."""
    squares: Dict[str, float] = {}
    for name, norm in zip(names, norms, strict=True):
        squares[layer_of(name)] = squares.get(layer_of(name), 0.0) + float(norm) ** 2
    return {layer: math.sqrt(sq) for layer, sq in squares.items()}


class _EventFile:
    """A CSV of rows that start with a step, opened lazily; resumed at `first_step`, it keeps the earlier rows."""

    def __init__(self, path: str, columns: Sequence[str], first_step: Optional[int]):
        self.path, self.columns = path, columns
        self._file: Optional[IO[str]] = None
        kept: List[List[str]] = []
        if first_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                kept = [r for r in list(csv.reader(f))[1:]
                        if len(r) == len(columns) and r[0].isdigit() and int(r[0]) < first_step]
        self.kept = kept  # the earlier rows, as read
        if kept or os.path.exists(path):
            text = io.StringIO(newline="")
            csv.writer(text).writerows([columns, *kept])
            write_atomically(path, text.getvalue())
            self._open()

    def _open(self) -> None:
        new = not os.path.exists(self.path)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(self.columns)

    def write(self, row: Sequence[Any]) -> None:
        if self._file is None:
            self._open()
        self._csv.writerow(row)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


