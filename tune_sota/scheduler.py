"""Early stopping that is fair to every schedule length and shape, and the scheduler factory (`search.scheduler`).

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

Schedule shapes (`sched`). A share of the schedule is a phase only within one shape. At half of its
schedule a one_cycle trial (warm-up to 25%, then a cosine anneal) is a third of the way down its
anneal, while a flat_cos trial (flat to 75%) is still at its peak learning rate: its accuracy there is
the noisy one of a high learning rate, and it would lose to one_cycle trials that end no better. So
a rung compares a trial only with trials of the same `sched` (the trainable reports it with every
epoch; the trial's config is the fallback): each shape keeps its own rung records and its own
cutoff, as if it were a separate ASHA over the same shares. The alternative, moving each shape's
rung to a comparable phase (the same share of the anneal), would put a flat_cos rung at 83% of its
schedule: at 5 epochs that is the last epoch, and early stopping would save nothing. The price of
separate records is that each shape's first trials at a rung always go on; a space that searches
`sched` spends a little more before stopping starts. Within a shape, `pct_start` still moves the
phase: at the default rung (50%) one_cycle trials with pct_start <= 0.5 are all annealing and
flat_cos trials with pct_start >= 0.5 are all on their flat part, so spaces keep pct_start on one
side of the rungs. On the flat part a high learning rate looks worse than it ends, the bias the
one_cycle rungs avoid by sitting past the peak: the recorded-curves simulator (bench/) measures it.

The rung records are the scheduler's whole state; Ray does not save a scheduler with the experiment,
so they are written to a JSON file in the search's `state/` folder (runstate.py says why not beside it)
and read back on resume: a resumed search makes the same decisions the uninterrupted one would have.
Each decision is appended to a journal beside it (`scheduler.jsonl`, one line per record) and the whole
file is rewritten at most every SNAPSHOT_EVERY_S and at the end of the search (`compact`): rewriting it at
every decision made a thousand-trial search's saves grow with the square of its trials (bench/scale.py).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from tune_sota import runstate
from tune_sota.config import Config, write_atomic
from tune_sota.schedule import rung_shares

SNAPSHOT_EVERY_S = 5.0  # the whole state file at most this often; every decision reaches the journal at once


def journal_of(state_file) -> Path:
    """The journal of a state file: the decisions recorded since the file was last written in full."""
    return Path(state_file).with_suffix(".jsonl")


def read_state(state_file) -> dict:
    """A state file with its journal replayed: {repr(share): {trial id: value}, "groups": {trial id: shape},
    "judged_at": {trial id: epoch}}."""
    path = Path(state_file)
    state = json.loads(path.read_text()) if path.is_file() else {}
    state.setdefault("groups", {})
    state.setdefault("judged_at", {})
    journal = journal_of(path)
    for line in journal.read_text().splitlines() if journal.is_file() else ():
        try:
            share, trial_id, value, group, *epoch = json.loads(line)  # no epoch in lines of before judged_at
        except ValueError:  # the last line of a driver killed mid-write
            continue
        state.setdefault(repr(float(share)), {})[trial_id] = value
        if group is not None:
            state["groups"][trial_id] = group
        if epoch:
            state["judged_at"][trial_id] = epoch[0]
    return state


def compact(state_file) -> None:
    """Write the state file in full, journal included, and drop the journal (the end of a search calls it)."""
    if Path(state_file).is_file() or journal_of(state_file).is_file():
        write_atomic(Path(state_file), json.dumps(read_state(state_file), indent=1))
        journal_of(state_file).unlink(missing_ok=True)


class ScheduleASHA(FIFOScheduler):
    """Asynchronous successive halving with rungs at shares of each trial's own schedule.

    A trial that reaches a rung is stopped if its metric is below the top 1/rf of the values
    recorded at that rung so far by trials of the same schedule shape (ASHA's rule, per `sched`);
    the first trials of a shape at a rung always go on.
    """

    DEFAULT_GROUP = "one_cycle"  # the shape of a trial that reports none (a search from before `sched`)
    final_size = False  # what a scheduler pickled before the option existed (a resumed search) goes on with
    _snapshot_at = -math.inf  # when the state file was last written in full (time.monotonic)

    def __init__(self, *, shares: list[float], reduction_factor: int, state_file: str | None = None,
                 metric: str | None = None, mode: str | None = None, final_size: bool = False):
        super().__init__()
        self.key, self.direction = metric, mode  # Tune sets them (set_search_properties) when not given
        self.shares, self.rf, self.state_file = sorted(shares), reduction_factor, state_file
        self.final_size = final_size  # judge a trial at a rung only once it trains at its final size
        self.records: dict[float, dict[str, float]] = {s: {} for s in self.shares}
        self.groups: dict[str, str] = {}  # trial id -> its schedule shape, for those not of DEFAULT_GROUP
        self.judged_at: dict[str, int] = {}  # trial id -> epoch of its latest rung (shows where a rung waited)
        self._load()

    def __setstate__(self, state):  # unpickled by Tuner.restore: take up the saved rung records
        self.__dict__.update({"judged_at": {}, **state})  # a scheduler pickled before judged_at existed
        if self.state_file:  # one pickled before state/ existed: its files move there (runstate.state_file)
            runstate.relocated(str(journal_of(self.state_file)))
            self.state_file = runstate.relocated(self.state_file)
        self._load()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """Take Tune's metric and mode unless given at construction."""
        self.key, self.direction = self.key or metric, self.direction or mode
        return True

    def _load(self) -> None:
        if self.state_file and (Path(self.state_file).is_file() or journal_of(self.state_file).is_file()):
            saved = read_state(self.state_file)
            self.records = {s: dict(saved.get(repr(s), {})) for s in self.shares}
            self.groups = dict(saved.get("groups", {}))  # absent in the files of searches before `sched`
            self.judged_at = dict(saved.get("judged_at", {}))

    def _save(self, new: list[tuple[float, str, float, str | None, int]]) -> None:
        """Record the decisions `new` (share, trial id, value, shape if not the default, epoch judged at):
        appended to the journal, or the whole state written when the last full write is SNAPSHOT_EVERY_S old."""
        if not self.state_file:
            return
        if time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S:
            state = {**{repr(s): r for s, r in self.records.items()}, "groups": self.groups,
                     "judged_at": self.judged_at}
            write_atomic(Path(self.state_file), json.dumps(state, indent=1))
            journal_of(self.state_file).unlink(missing_ok=True)  # after: a replayed record is the same record
            self._snapshot_at = time.monotonic()
        else:
            with open(journal_of(self.state_file), "a") as journal:
                journal.write("".join(json.dumps(list(entry)) + "\n" for entry in new))

    def group_of(self, trial_id: str) -> str:
        """The schedule shape a recorded trial was judged with."""
        return self.groups.get(trial_id, self.DEFAULT_GROUP)

    def decide(self, trial_id: str, epoch: int, epochs: int, value: float, group: str = DEFAULT_GROUP,
               at_final_size: bool = True, unfrozen: bool = True) -> str:
        """CONTINUE or STOP for a trial that finished `epoch` of `epochs` with `value`, judged against the
        trials of the same schedule shape `group` (the rule itself, without Ray: what `on_trial_result`
        applies). A trial still in an earlier, smaller stage of progressive resizing (`at_final_size`
        False) is not judged yet: its rungs wait for its first epoch at the final size. Nor is a fine-tune
        still training its head alone (`unfrozen` False): a frozen body's accuracy is another regime."""
        if epochs <= 0 or epoch >= epochs or not math.isfinite(value) or not unfrozen:
            return TrialScheduler.CONTINUE
        if self.final_size and not at_final_size:
            return TrialScheduler.CONTINUE
        sign = 1.0 if self.direction == "max" else -1.0
        action, new = TrialScheduler.CONTINUE, []
        for share in self.shares:
            recorded = self.records[share]
            if epoch / epochs + 1e-9 < share or trial_id in recorded:
                continue
            peers = [sign * v for t, v in recorded.items() if self.group_of(t) == group]
            if peers:
                cutoff = np.percentile(peers, (1 - 1 / self.rf) * 100)
                if sign * value < cutoff:
                    action = TrialScheduler.STOP
            recorded[trial_id] = value
            if group != self.DEFAULT_GROUP:
                self.groups[trial_id] = group
            self.judged_at[trial_id] = epoch
            new.append((share, trial_id, value, group if group != self.DEFAULT_GROUP else None, epoch))
        if new:
            self._save(new)
        return action

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Judge a trial at each rung share it has reached, among trials of its schedule shape (`sched`, as
        reported, else from its config); results of failed epochs are not judged."""
        if result.get("error") or result.get("diverged") or self.key not in result:
            return TrialScheduler.CONTINUE
        config = getattr(trial, "config", None) or {}
        group = result.get("sched") or config.get("sched") or self.DEFAULT_GROUP
        # A space that does not fix `size` trains at Config's default: the trial's config then has no size,
        # and the size being trained must not stand in for the final one (every epoch would count as final).
        final = config.get("size") or Config.size
        at_final = not result.get("size") or int(result["size"]) >= int(final)  # no size reported: a final epoch
        return self.decide(trial.trial_id, int(result["epoch"]), int(result["epochs"]), float(result[self.key]),
                           group=str(group), at_final_size=at_final, unfrozen=not result.get("frozen"))

    def debug_string(self) -> str:
        return "ScheduleASHA: " + ", ".join(f"{s:.0%} of schedule: {len(r)} recorded" for s, r in self.records.items())


def make_scheduler(name: str, *, grace: float, reduction_factor: int, max_epochs: int,
                   state_file: str | None = None, final_size: bool = False) -> TrialScheduler:
    """The scheduler a space names: `asha` (schedule-fair, the default), `fifo` (no early stopping), or
    `ray-asha` (Ray's stock ASHA on epoch counts, kept only to measure what the fair one changes)."""
    if name == "fifo":
        return FIFOScheduler()
    if name == "ray-asha":
        return ASHAScheduler(time_attr="epoch", max_t=max_epochs,
                             grace_period=max(1, math.ceil(grace * max_epochs - 1e-9)),
                             reduction_factor=reduction_factor)
    return ScheduleASHA(shares=rung_shares(grace, reduction_factor), reduction_factor=reduction_factor,
                        state_file=state_file, final_size=final_size)
