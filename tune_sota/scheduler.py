"""Early stopping that is fair to every schedule length, and the scheduler factory (`search.scheduler`).

Stock ASHA judges trials at fixed epoch counts. When `epochs` is searched that compares a long
one-cycle run in the middle of its schedule (learning rate still high) with a short one that has
already annealed, and the long run loses although it ends better: a searched `epochs` drifts towards
short schedules. `ScheduleASHA` places its rungs at *shares of each trial's own schedule* instead (the
way Syne Tune's `max_resource_attr` tells the scheduler each trial's budget), so a trial is compared
only with trials at the same phase of their one-cycle schedule. Trials of one length are judged at
the epochs where that share falls; a share between two epochs is judged at the first epoch past it.

Where the rungs sit matters as much: early in one-cycle every trial is warming up, and at the
learning-rate peak (25% of the schedule in fastai) a high learning rate looks worst while ending
best. The rungs are the ASHA geometry on shares, 1/rf, 1/rf^2, ... down to `search.grace`: with the
default grace 0.5 and rf 2 there is one rung at half of each schedule, past the peak (see the README
for the measurement behind it).

The rung records are the scheduler's whole state; Ray does not save a scheduler with the experiment,
so they are written to a JSON file beside the search and read back on resume: a resumed search makes
the same decisions the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from tune_sota.config import write_atomic
from tune_sota.schedule import rung_shares


class ScheduleASHA(FIFOScheduler):
    """Asynchronous successive halving with rungs at shares of each trial's own schedule.

    A trial that reaches a rung is stopped if its metric is below the top 1/rf of the values
    recorded at that rung so far (ASHA's rule); the first trials at a rung always go on.
    """

    def __init__(self, *, shares: list[float], reduction_factor: int, state_file: str | None = None,
                 metric: str | None = None, mode: str | None = None):
        super().__init__()
        self.key, self.direction = metric, mode  # Tune sets them (set_search_properties) when not given
        self.shares, self.rf, self.state_file = sorted(shares), reduction_factor, state_file
        self.records: dict[float, dict[str, float]] = {s: {} for s in self.shares}
        self._load()

    def __setstate__(self, state):  # unpickled by Tuner.restore: take up the saved rung records
        self.__dict__.update(state)
        self._load()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """Take Tune's metric and mode unless given at construction."""
        self.key, self.direction = self.key or metric, self.direction or mode
        return True

    def _load(self) -> None:
        if self.state_file and Path(self.state_file).is_file():
            saved = json.loads(Path(self.state_file).read_text())
            self.records = {s: dict(saved.get(repr(s), {})) for s in self.shares}

    def _save(self) -> None:
        if self.state_file:
            write_atomic(Path(self.state_file), json.dumps({repr(s): r for s, r in self.records.items()}, indent=1))

    def decide(self, trial_id: str, epoch: int, epochs: int, value: float) -> str:
        """CONTINUE or STOP for a trial that finished `epoch` of `epochs` with `value` (the rule itself,
        without Ray: what `on_trial_result` applies)."""
        if epochs <= 0 or epoch >= epochs or not math.isfinite(value):
            return TrialScheduler.CONTINUE
        sign = 1.0 if self.direction == "max" else -1.0
        action, changed = TrialScheduler.CONTINUE, False
        for share in self.shares:
            recorded = self.records[share]
            if epoch / epochs + 1e-9 < share or trial_id in recorded:
                continue
            if recorded:
                cutoff = np.percentile([sign * v for v in recorded.values()], (1 - 1 / self.rf) * 100)
                if sign * value < cutoff:
                    action = TrialScheduler.STOP
            recorded[trial_id] = value
            changed = True
        if changed:
            self._save()
        return action

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Judge a trial at each rung share it has reached; results of failed epochs are not judged."""
        if result.get("error") or result.get("diverged") or self.key not in result:
            return TrialScheduler.CONTINUE
        return self.decide(trial.trial_id, int(result["epoch"]), int(result["epochs"]), float(result[self.key]))

    def debug_string(self) -> str:
        return "ScheduleASHA: " + ", ".join(f"{s:.0%} of schedule: {len(r)} recorded" for s, r in self.records.items())


def make_scheduler(name: str, *, grace: float, reduction_factor: int, max_epochs: int,
                   state_file: str | None = None) -> TrialScheduler:
    """The scheduler a space names: `asha` (schedule-fair, the default), `fifo` (no early stopping), or
    `ray-asha` (Ray's stock ASHA on epoch counts, kept only to measure what the fair one changes)."""
    if name == "fifo":
        return FIFOScheduler()
    if name == "ray-asha":
        return ASHAScheduler(time_attr="epoch", max_t=max_epochs,
                             grace_period=max(1, math.ceil(grace * max_epochs - 1e-9)),
                             reduction_factor=reduction_factor)
    return ScheduleASHA(shares=rung_shares(grace, reduction_factor), reduction_factor=reduction_factor,
                        state_file=state_file)
