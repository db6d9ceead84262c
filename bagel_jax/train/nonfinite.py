"""What the loop does when steps go non-finite (NaN/inf loss or gradients), by ``train.nonfinite``.

The train step itself never applies a non-finite update (it keeps the old params, optimizer state and EMA and counts
the step in ``state.nonfinite_steps``). On the host, ``NonFiniteGuard.update`` compares that count at each logging
step and before each checkpoint (so no checkpoint is ever written after a non-finite step), and then:

* ``skip``: warns, and halts once ``train.max_consecutive_nonfinite`` steps in a row were non-finite;
* ``halt``: stops the run with ``NonFiniteError``;
* ``rollback`` (PaLM's loss-spike recipe): the loop restores the newest usable checkpoint, skips the next
  ``train.rollback_skip_batches`` data batches and continues — at most ``train.max_rollbacks`` times, then halts.

A checkpoint from which the run went non-finite again before it wrote the next one is marked unusable (it may hold
exploded-but-finite params): later rollbacks and restarts (``halt`` too) resume from an older one, so a restart
never halts forever on the same bad state. The record lives in ``<workdir>/nonfinite.json`` (written by process 0;
read by every process at start).
"""

from __future__ import annotations

import json
import logging
import os

import jax

RECORD = "nonfinite.json"
MODES = ("skip", "halt", "rollback")


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite steps (``train.nonfinite``)."""


class NonFiniteGuard:
    """Host-side bookkeeping of non-finite steps for one run (see the module docstring)."""

    def __init__(self, config, workdir: str, *, step: int, count: int):
        t = config.train
        self.mode, self.path = t.nonfinite, os.path.join(workdir, RECORD)
        self.max_consecutive, self.max_rollbacks = int(t.max_consecutive_nonfinite), int(t.max_rollbacks)
        self.skip_batches = int(t.rollback_skip_batches)
        self.record = load_record(workdir)
        self.started_from: int | None = step if step > 0 else None  # the checkpoint this attempt started from
        self.saved_since_start = False
        self._step, self._count, self.consecutive = step, count, 0

    @property
    def bad_checkpoints(self) -> set[int]:
        return set(self.record["bad_checkpoints"])

    @property
    def rollbacks(self) -> int:
        return int(self.record["rollbacks"])

    def update(self, step: int, count: int) -> bool:
        """Takes the cumulative non-finite count after ``step``; True when the loop must roll back now.
        Raises ``NonFiniteError`` when the run must stop."""
        new, interval = count - self._count, step - self._step
        self._step, self._count = step, count
        if new <= 0:
            self.consecutive = 0
            return False
        # between two checks only the count is known: all-bad intervals chain, otherwise at least the last `new`
        self.consecutive = self.consecutive + new if new == interval else new
        where = f"{new} non-finite step(s) (NaN/inf loss or gradients) in steps {step - interval + 1}..{step}"
        if self.mode == "skip":
            logging.warning(
                "%s: updates skipped (train.nonfinite=skip; %d in a row, %d in all)", where, self.consecutive, count
            )
            if self.max_consecutive and self.consecutive >= self.max_consecutive:
                raise NonFiniteError(
                    f"train.nonfinite=skip: {self.consecutive} non-finite steps in a row up to step "
                    f"{step} (train.max_consecutive_nonfinite={self.max_consecutive})"
                )
            return False
        self._mark_start_bad()
        if self.mode == "rollback" and self.rollbacks < self.max_rollbacks:
            self.record["rollbacks"] += 1
            self._write()
            logging.warning(
                "%s: rolling back (%d of train.max_rollbacks=%d)", where, self.rollbacks, self.max_rollbacks
            )
            return True
        self._write()
        if self.mode == "rollback":
            raise NonFiniteError(
                f"train.nonfinite=rollback: {where}, after {self.rollbacks} rollbacks "
                f"(train.max_rollbacks={self.max_rollbacks})"
            )
        raise NonFiniteError(f"train.nonfinite=halt: {where}; a restart resumes from a checkpoint before them")

    def saved(self, step: int) -> None:
        """The loop wrote a checkpoint at ``step`` (all steps up to it finite)."""
        del step
        self.saved_since_start = True

    def restarted_from(self, step: int, count: int) -> None:
        """The loop rolled back to the checkpoint at ``step`` (whose non-finite count is ``count``)."""
        self.started_from, self.saved_since_start = step, False
        self._step, self._count, self.consecutive = step, count, 0

    def forget(self, steps: list[int]) -> None:
        """Checkpoints ``steps`` were set aside: their step numbers will be written again by a new state."""
        if set(steps) & self.bad_checkpoints:
            self.record["bad_checkpoints"] = sorted(self.bad_checkpoints - set(steps))
            self._write()

    def _mark_start_bad(self) -> None:
        # the run went non-finite before writing a checkpoint after the one it started from: that one is suspect
        if self.started_from is not None and not self.saved_since_start:
            self.record["bad_checkpoints"] = sorted(self.bad_checkpoints | {self.started_from})

    def _write(self) -> None:
        if jax.process_index() == 0:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(self.record, fh, indent=2, sort_keys=True)
            os.replace(tmp, self.path)


def load_record(workdir: str) -> dict:
    """``{"rollbacks": n, "bad_checkpoints": [steps]}`` of the run in ``workdir`` (empty when none)."""
    path = os.path.join(workdir, RECORD)
    record = {"rollbacks": 0, "bad_checkpoints": []}
    if os.path.isfile(path):
        with open(path) as fh:
            record.update(json.load(fh))
    return record


def usable_step(steps: list[int], bad: set[int], source: str) -> int:
    """The newest of ``steps`` not in ``bad``; ``NonFiniteError`` naming ``source`` when there is none."""
    good = [s for s in steps if s not in bad]
    if not good:
        raise NonFiniteError(
            f"{source}: every kept checkpoint {sorted(steps)} went non-finite when resumed "
            f"(train.keep_checkpoints keeps too few, or the run diverges from its start)"
        )
    return max(good)
