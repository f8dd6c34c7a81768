"""Preemption-safe `distclip train`: checkpoints every N steps and on SIGTERM, and `--resume`.

What a checkpoint holds (one `tf.train.Checkpoint`): the model, the optimizer
(slots, `iterations`), the `ClipStep` (its counters and any policy state) and
the loop's own `Progress` (the next step, the clipped-step count and the last
100 losses for the summary). The data needs no state: step i's batch is a pure
function of (seed, i) (`distclip.train.adding.batch`), and the model draws no
random numbers while training. So a resumed run takes exactly the steps an
uninterrupted run takes, and ends with bit-identical weights.

Stopping on SIGTERM (what Slurm sends before a time limit, at preemption and on
`scancel`): the handler only sets a flag. Every rank feeds its flag into the
next step's loss reduction (no extra collective), so all ranks learn at the
same step that one of them was asked to stop, save after that step, wait for
each other, and exit with status 143 (128 + SIGTERM): a run that did not
finish, resumable with `--resume`.

Damage: `--resume` restores the newest checkpoint that can be read. A newer one
that cannot (a missing `.index`, a truncated `.data` file) is named on stderr
and moved, not deleted, to `OUT/checkpoints/damaged/`; if none can be read the
run stops with an error naming the files. It never starts again from step 0
while checkpoint files exist. `config.json` (the run's settings, checked on
resume) is written atomically before the first checkpoint; on resume a missing
or unreadable one is an error.

Who writes: the chief writes `OUT/checkpoints`; the other processes of a
MultiWorkerMirroredStrategy save too (TensorFlow's rule: saving may need every
worker) into a scratch folder they delete; under Horovod only rank 0 writes, as
Horovod users do. Every rank restores from `OUT/checkpoints`, so on several
machines OUT must be on a shared file system.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf

from distclip.train.config import Config, changed_on_resume, describe_changes

#: Exit status of a run stopped by SIGTERM after its checkpoint was written.
STOPPED = 128 + signal.SIGTERM
TAIL = 100  # the summary's final loss is the mean of the last TAIL losses


class Progress(tf.Module):
    """The loop's own state: the next step, how many steps clipped, the latest losses (a ring of TAIL)."""

    def __init__(self):
        super().__init__(name="progress")
        with tf.device("CPU:0"):
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.clipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="clipped")
            self.losses = tf.Variable(tf.zeros([TAIL], tf.float64), trainable=False, name="losses")

    def record(self, step: int, loss: float, clipped: bool) -> None:
        self.losses[step % TAIL].assign(loss)
        self.clipped.assign_add(int(clipped))
        self.step.assign(step + 1)

    def final_loss(self) -> float:
        n = int(self.step.numpy())
        losses = self.losses.numpy()[:min(n, TAIL)]
        finite = losses[np.isfinite(losses)]  # a skipped step's loss may be NaN
        return float(np.mean(finite)) if finite.size else float("nan")


_FILE = re.compile(r"ckpt-(\d+)\.(index|data-\d+-of-\d+)")


def _on_disk(directory: str) -> Dict[int, List[str]]:
    """The checkpoints' files in `directory` by checkpoint number, whatever the `checkpoint` state file says."""
    found: Dict[int, List[str]] = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        m = _FILE.fullmatch(name)
        if m:
            found.setdefault(int(m.group(1)), []).append(name)
    return found


class Checkpoints:
    """`OUT/checkpoints`, written by the chief (see the module docstring), read by every rank."""

    def __init__(self, cfg: Config, runner, **objects):
        self.directory = os.path.join(cfg.out, "checkpoints")
        self.runner = runner
        self.cfg = cfg
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager: Optional[tf.train.CheckpointManager] = None  # made at the first save, after restore
        self.saved_step: Optional[int] = None
        self._config_written = False

    def restore(self) -> int:
        """Restores the newest readable checkpoint, if there is any checkpoint; returns the step to start at.

        Raises:
          SystemExit: checkpoint files exist but none can be read, config.json is missing or unreadable or
            names other settings, or the checkpoint is beyond --steps.
        """
        found = _on_disk(self.directory)
        if not found:
            return 0
        self._check_config()
        damaged: List[str] = []
        for number in sorted(found, reverse=True):
            prefix = os.path.join(self.directory, f"ckpt-{number}")
            try:
                if f"ckpt-{number}.index" not in found[number]:
                    raise FileNotFoundError(f"{prefix}.index is missing")
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except Exception as e:  # whatever TensorFlow raises for a damaged file (IndexError for a short read)
                damaged.append(f"{prefix} ({', '.join(found[number])}): {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}")
                continue
            break
        else:
            raise SystemExit(f"distclip train --resume: no checkpoint in {self.directory} can be read:\n  "
                             + "\n  ".join(damaged)
                             + "\nThey were left as they are (nothing was moved or deleted): put back a readable copy "
                             "and --resume again, or start a new run with another --out.")
        step = int(self.checkpoint.progress.step.numpy())
        if step > self.cfg.steps:
            raise SystemExit(f"distclip train --resume: the checkpoint in {self.directory} is at step {step}, "
                             f"beyond --steps={self.cfg.steps}")
        self.runner.barrier()  # every rank has read the files before the chief moves any
        if self.runner.chief:
            self._set_aside({n: names for n, names in found.items() if n > number}, damaged)
            good = [os.path.join(self.directory, f"ckpt-{n}") for n in sorted(found) if n <= number]
            tf.compat.v1.train.update_checkpoint_state(self.directory, good[-1], all_model_checkpoint_paths=good)
        self.saved_step = step
        return step

    def _set_aside(self, files: Dict[int, List[str]], why: List[str]) -> None:
        """Moves the damaged newer checkpoints' `files` to `damaged/` (never deletes them), and says so."""
        if not files:
            return
        aside = os.path.join(self.directory, "damaged")
        os.makedirs(aside, exist_ok=True)
        for names in files.values():
            for name in names:
                target = os.path.join(aside, name)
                while os.path.exists(target):
                    target += ".again"
                os.replace(os.path.join(self.directory, name), target)
        print("distclip train --resume: cannot read " + "; ".join(why) + f"; moved to {aside}, resuming from the "
              "newest checkpoint that can be read", file=sys.stderr, flush=True)

    def save(self, step: int) -> None:
        """Writes the state after `step` steps (once per step), then waits until every rank has."""
        if self.saved_step == step:
            return
        if self.runner.chief:
            if not self._config_written:  # before the first checkpoint: a resumed run checks against it
                os.makedirs(self.directory, exist_ok=True)
                _write_config(os.path.join(self.directory, "config.json"), self.cfg)
                self._config_written = True
            if self.manager is None:
                self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=2)
            self.manager.save(checkpoint_number=step)
        elif self.runner.saves_on_every_worker:
            scratch = tempfile.mkdtemp(prefix="distclip-checkpoint-")
            try:
                self.checkpoint.write(os.path.join(scratch, "ckpt"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self.saved_step = step
        self.runner.barrier()

    def after(self, done: int, stop: bool, flush: Callable[[], None]) -> bool:
        """After `done` steps: on an agreed SIGTERM before the last step, saves and returns True (stop);
        every `--checkpoint-every` steps, flushes the step log (its rows reach the disk before the
        checkpoint does) and saves."""
        if stop and done < self.cfg.steps:
            flush()
            self.save(done)
            return True
        if self.cfg.checkpoint_every and done % self.cfg.checkpoint_every == 0:
            flush()
            self.save(done)
        return False

    def _check_config(self) -> None:
        path = os.path.join(self.directory, "config.json")
        try:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError(f"a JSON object was expected, not {type(saved).__name__}")
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"distclip train --resume: cannot read {path} ({e.strerror if isinstance(e, OSError) else e}), "
                "the settings the checkpoints beside it were written with, so this run's cannot be checked against "
                "them. Restore it, or give another --out."
            ) from None
        now = json.loads(json.dumps(asdict(self.cfg)))  # as saved: a tuple (--nan-at) reads back as a list
        differ = changed_on_resume(saved, now)
        if differ:
            raise SystemExit(
                f"distclip train --resume: the checkpoint in {self.directory} was written with other settings "
                f"(config.json):\n{describe_changes(saved, now, differ)}\n"
                "Resume with the settings the run was started with, or start a new run with another --out. "
                "The checkpoints are fine and were not touched.")

def announce(cfg: Config, runner, checkpoints: Checkpoints, first: int) -> None:
    """Says (chief only) where a `--resume` run starts."""
    if cfg.resume and runner.chief:
        print(f"distclip train: resuming at step {first} from {checkpoints.directory}" if first else
              f"distclip train: no checkpoint in {checkpoints.directory}; starting at step 0",
              file=sys.stderr, flush=True)


def stopped(cfg: Config, runner, checkpoints: Checkpoints, step: int) -> None:
    """Ends a run stopped by SIGTERM after `step` steps (checkpoint written): says so, and exits 143."""
    if runner.chief:
        print(f"\ndistclip train: stopped by SIGTERM after step {step} of {cfg.steps}; checkpoint in "
              f"{checkpoints.directory}; continue with --resume", file=sys.stderr, flush=True)
    raise SystemExit(STOPPED)


class StopOnSigterm:
    """While entered, SIGTERM sets `requested` (once announced) instead of ending the process."""

    def __init__(self, who: str):
        self.who = who
        self.requested = False

    def _handler(self, signum, _frame) -> None:
        if not self.requested:
            print(f"{self.who}: {signal.Signals(signum).name} received; checkpointing after this step, then exiting",
                  file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> "StopOnSigterm":
        self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._old)


def _write_config(path: str, cfg: Config) -> None:
    """config.json, whole or not at all after a kill: a temporary file, fsynced, renamed into place."""
    with open(path + ".partial", "w") as f:
        json.dump(asdict(cfg), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)
