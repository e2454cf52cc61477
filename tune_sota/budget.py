"""A search sized in hours: `--time-budget 8h` (`search.time_budget`).

Once the budget is spent no trial starts, each running trial stops at its next checkpoint (the end of
its current epoch, where it reports), and the search goes on to its confirmation.

Ray Tune's own `TuneConfig(time_budget_s=...)` is not used: in Ray 2.60 it is a `TimeoutStopper`
whose `stop_all` makes the controller stop every unfinished trial at once (`_stop_experiment_if_needed`),
so running trials lose the epoch they were in, and Tune reports them `TERMINATED` like any other.
Here public hooks do it at checkpoints: a `TrialScheduler` wrapped around the search's own (it
chooses no trial to start once the budget is spent, and answers STOP to a running trial's next report),
the searcher (`StudySearcher.stop_when`: it suggests no trial once spent, since Ray starts every trial
it has created, whatever the scheduler chooses), and a `Stopper` whose `stop_all` ends the run once no
trial is left running. The trials it stopped are `out_of_time` in the trial table; one created before
the budget ran out but not yet trained an epoch is ended too, as `not_started`.
"""

from __future__ import annotations

import logging
import time

from ray.tune.schedulers import TrialScheduler
from ray.tune.stopper import Stopper

from tune_sota.config import parse_duration  # noqa: F401  (the budget's format lives with the schema)

log = logging.getLogger(__name__)

class TimeBudget(TrialScheduler):
    """The search's scheduler (`inner`), except that once `seconds` have passed no trial starts and a
    running trial stops at its next report (each report carries a checkpoint)."""

    def __init__(self, inner: TrialScheduler, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, float(seconds)
        self.used = 0.0  # seconds of budget used; counted like Ray's TimeoutStopper, so a resume goes on
        self._last: float | None = None
        self.spent_after: float | None = None  # `used` when the budget ran out
        self.running: set[str] = set()  # trials this scheduler let start that have not ended
        self.out_of_time: set[str] = set()  # trials stopped at a checkpoint because the budget ran out

    def __setstate__(self, state):  # restored by Tuner.restore: the clock goes on from now
        self.__dict__.update(state)
        self._last = None

    @property
    def spent(self) -> bool:
        """Whether the budget has run out (the clock advances on every question Ray asks)."""
        now = time.time()
        if self._last is not None:
            self.used += now - self._last
        self._last = now
        if self.spent_after is None and self.used >= self.seconds:
            self.spent_after = self.used
            log.info("tune-sota: the time budget (%s) is spent: no new trial starts; %d running trial(s) stop at "
                     "their next checkpoint", _clock(self.seconds), len(self.running))
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
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.running.discard(trial.trial_id)
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP and self.spent and not result.get("done"):
            decision = TrialScheduler.STOP
            self.out_of_time.add(trial.trial_id)
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
                "stopped_at_checkpoint": sorted(self.out_of_time)}


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
