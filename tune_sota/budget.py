"""A search sized in hours: `--time-budget 8h` (`search.time_budget`).

Once the budget is spent no trial starts, each running trial stops at the end of its current epoch
(where it reports; it goes on from its last checkpoint if resumed), and the search goes on to its
confirmation.

Ray Tune's own `TuneConfig(time_budget_s=...)` is not used: in Ray 2.60 it is a `TimeoutStopper`
whose `stop_all` makes the controller stop every unfinished trial at once (`_stop_experiment_if_needed`),
so running trials lose the epoch they were in, and Tune reports them `TERMINATED` like any other.
Here public hooks do it at the ends of epochs: a `TrialScheduler` wrapped around the search's own (it
chooses no trial to start once the budget is spent, and answers STOP to a running trial's next report),
the searcher (`StudySearcher.stop_when`: it suggests no trial once spent, since Ray starts every trial
it has created, whatever the scheduler chooses), and a `Stopper` whose `stop_all` ends the run once no
trial is left running. The trials it stopped are `out_of_time` in the trial table; one created before
the budget ran out but not yet trained an epoch is ended too, as `not_started`.

One budget per search, whatever Ray pickles: Ray keeps the scheduler in `tuner.pkl`, the stopper in its
experiment state, and the searcher holds `is_spent`; unpickled separately they would be three clocks
(a resumed search granted a fresh budget, a stopper waiting on trials that had long ended). So a
`TimeBudget` unpickles to the one live budget of its state file in this process, and its clock and
what it stopped are kept in `results/NAME/state/budget.json` (as the scheduler's rungs are in
`state/scheduler.json`): a resumed search goes on with what was left.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ray.tune.schedulers import TrialScheduler
from ray.tune.stopper import Stopper

from tune_sota import runstate
from tune_sota.config import (
    parse_duration,  # noqa: F401  (the budget's format lives with the schema)
    write_atomic,
)

log = logging.getLogger(__name__)
SAVE_EVERY_S = 10.0  # how often the clock is written to budget.json while the budget lasts
_LIVE: dict[str, TimeBudget] = {}  # state file -> the budget of that search in this process


def live(state_file: str) -> TimeBudget | None:
    """The budget of the search whose state file is `state_file`, once Ray has built or restored it here."""
    return _LIVE.get(str(state_file))


def _revive(inner: TrialScheduler, seconds: float, state_file: str) -> TimeBudget:
    """Unpickling: the live budget of `state_file` if this process has one, else one read back from it (a
    budget pickled before `state/` existed reads and writes its file there: runstate.relocated)."""
    state_file = runstate.relocated(state_file)
    return _LIVE.get(state_file) or TimeBudget(inner, seconds, state_file)


class TimeBudget(TrialScheduler):
    """The search's scheduler (`inner`), except that once `seconds` have passed no trial starts and a
    running trial stops at its next report (the end of its current epoch)."""

    def __init__(self, inner: TrialScheduler, seconds: float, state_file: str):
        super().__init__()
        self.inner, self.seconds, self.state_file = inner, float(seconds), str(state_file)
        self.used = 0.0  # seconds of budget used, counted while Ray asks (so a resume goes on)
        self._last: float | None = None
        self._saved_at = 0.0
        self.spent_after: float | None = None  # `used` when the budget ran out
        self.running: set[str] = set()  # trials added and not yet ended
        self.out_of_time: set[str] = set()  # trials stopped at the end of an epoch because the budget ran out
        if Path(self.state_file).is_file():
            saved = json.loads(Path(self.state_file).read_text())
            self.used, self.spent_after = float(saved["used"]), saved["spent_after"]
            self.out_of_time = set(saved["out_of_time"])
        _LIVE[self.state_file] = self

    def __reduce__(self):
        return _revive, (self.inner, self.seconds, self.state_file)

    def _save(self) -> None:
        self._saved_at = time.time()
        write_atomic(Path(self.state_file), json.dumps({"used": self.used, "spent_after": self.spent_after,
                                                        "out_of_time": sorted(self.out_of_time)}))

    @property
    def spent(self) -> bool:
        """Whether the budget has run out (the clock advances on every question Ray asks)."""
        now = time.time()
        if self._last is not None:
            self.used += now - self._last
        self._last = now
        if self.spent_after is None and self.used >= self.seconds:
            self.spent_after = self.used
            self._save()
            log.info("tune-sota: the time budget (%s) is spent: no new trial starts; %d running trial(s) stop at "
                     "the end of their epoch", _clock(self.seconds), len(self.running))
        elif self.spent_after is None and now - self._saved_at > SAVE_EVERY_S:
            self._save()
        return self.spent_after is not None

    def is_spent(self) -> bool:
        """`spent`, as a callable for the searcher (`StudySearcher.stop_when`): Ray starts every trial it
        has created whatever the scheduler chooses, so no trial may be created once the budget is spent."""
        return self.spent

    # Ray's TrialScheduler interface, forwarded to the search's own scheduler.
    @property
    def metric(self):
        return self.inner.metric

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial):
        # Every trial counts from here, not from `choose_trial_to_run`: Ray also starts pending trials
        # without asking the scheduler. Ended trials come back here too when a search is resumed.
        if not trial.is_finished():
            self.running.add(trial.trial_id)
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.running.discard(trial.trial_id)
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        last = int(result.get("epoch", 0)) >= int(result.get("epochs", 0) or 0) > 0  # it has ended anyway
        if decision != TrialScheduler.STOP and self.spent and not result.get("done") and not last:
            decision = TrialScheduler.STOP
            self.out_of_time.add(trial.trial_id)
            self._save()
        if decision == TrialScheduler.STOP:
            self.running.discard(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self.running.discard(trial.trial_id)
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self.running.discard(trial.trial_id)
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        if self.spent:
            return None
        trial = self.inner.choose_trial_to_run(tune_controller)
        if trial is not None:
            self.running.add(trial.trial_id)
        return trial

    def debug_string(self) -> str:
        return self.inner.debug_string()

    def save(self, checkpoint_path: str):
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        self.inner.restore(checkpoint_path)

    def summary(self) -> dict:
        """How the budget went, for the summary and best.yaml."""
        return {"time_budget_s": self.seconds, "spent": self.spent_after is not None,
                "spent_after_s": round(self.spent_after, 1) if self.spent_after is not None else None,
                "stopped_out_of_time": sorted(self.out_of_time)}


class BudgetStop(Stopper):
    """Ends the run once the budget is spent and no trial is left running (pending trials never start)."""

    def __init__(self, budget: TimeBudget):
        self.budget = budget

    def __call__(self, trial_id, result) -> bool:
        return False  # running trials are stopped by the scheduler, at their reports

    def stop_all(self) -> bool:
        return self.budget.spent and not self.budget.running


def _clock(seconds: float) -> str:
    from tune_sota.results import clock

    return clock(seconds)
