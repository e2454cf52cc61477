"""The searcher: Optuna behind Ray Tune's public `Searcher` interface, with the study in an Optuna
storage (an SQLite file in the results folder unless `search.storage` names a database).

Owned here rather than taken from Ray's `OptunaSearch`, because that one tells Optuna that a trial
ASHA stopped *completed* with its partial-budget accuracy, which TPE then ranks beside fully trained
trials. Here such a trial is PRUNED (its per-epoch accuracies kept as intermediate values), a trial
that diverged or raised is FAIL, and only a trial that trained its whole schedule is COMPLETE.

Only public APIs are used: Ray's `Searcher` methods, Optuna's ask/tell, `Trial.report`, and the
storage's public methods. Every study trial carries its Ray trial id as the user attribute
`ray_trial_id`, so the study on disk is the searcher's whole state: a resumed search reloads it by
name, and `optuna.load_study` or `optuna-dashboard` read the same file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tune_sota.config import Dist
from tune_sota.priors import prior_sampler
from tune_sota.results import study_url  # noqa: F401  (the rule lives with the results it locates)

log = logging.getLogger(__name__)

RAY_ID = "ray_trial_id"  # the user attribute that links a study trial to its Ray trial


def distribution(d: Dist) -> BaseDistribution:
    """Optuna's distribution for a space value (`randint` bounds are inclusive in both)."""
    if d.kind == "choice":
        return CategoricalDistribution(list(d.args))
    if d.kind == "randint":
        return IntDistribution(int(d.args[0]), int(d.args[1]))
    return FloatDistribution(float(d.args[0]), float(d.args[1]), log=d.kind == "loguniform")


def sampler(kind: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named `kind`: TPE after `startup_trials` random ones, random throughout, or `gp`
    (Optuna's Gaussian-process sampler after `startup_trials` random ones)."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for the study's trial `number`: each proposal depends on the search's seed and
    its place in the study, not on how many processes asked before it (a resumed search's sampler would
    otherwise start its random start-up proposals over, repeating configs already run)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def outcome(result: dict | None, error: bool) -> TrialState:
    """How a finished Ray trial reaches the study: trained its whole schedule, stopped early, or failed."""
    r = result or {}
    if error or r.get("error") or r.get("diverged") or not r:
        return TrialState.FAIL
    return TrialState.COMPLETE if r.get("epoch", 0) >= r.get("epochs", 0) else TrialState.PRUNED


def open_storage(url) -> optuna.storages.BaseStorage:
    """The study's storage at `url`. An SQLite file is put in write-ahead-log mode with synchronous=NORMAL:
    a commit then no longer waits for the disk. Optuna commits about 18 times per trial, and each wait for
    an fsync held up Ray Tune's loop in the driver (bench/scale.py); a killed driver still loses nothing
    committed, a power cut at most the last commits, never the file."""
    if not isinstance(url, str) or not url.startswith("sqlite:"):
        return optuna.storages.get_storage(url)
    from sqlalchemy import event

    rdb = optuna.storages.RDBStorage(url)

    def pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(rdb.engine, "connect", pragmas)
    rdb.engine.dispose()  # the connection that created the tables goes; every new one takes the pragmas
    return optuna.storages.get_storage(rdb)


class StudySearcher(Searcher):
    """Optuna's sampler proposing trials for Ray Tune, told the truth about each trial's end."""

    def __init__(self, space: dict[str, Dist], *, storage: str, study_name: str, metric: str, mode: str,
                 kind: str = "tpe", seed: int = 0, startup_trials: int = 4, priors: str = "off"):
        super().__init__(metric=metric, mode=mode)
        self.distributions = {k: distribution(d) for k, d in space.items()}
        self.space, self.priors = space, priors  # search.priors: what the space's priors steer (priors.py)
        self.prior_options: dict = {}  # PriorSampler's beta, mix, candidates (the simulator's variants)
        self.storage, self.study_name = storage, study_name
        self.kind, self.seed, self.startup_trials = kind, seed, startup_trials
        self._study: optuna.Study | None = None
        self._storage = None
        self._sid: int | None = None  # the study's id in its storage, once loaded
        self._numbers: dict[str, int] = {}  # Ray trial id -> study trial number
        self._live: dict[int, optuna.Trial] = {}  # trials asked (or re-attached) in this process
        self.stop_when = None  # a callable: once it answers True no trial is suggested (budget.TimeBudget)

    # Ray pickles the searcher with the experiment; the study is reloaded from storage instead.
    def __getstate__(self):
        return {**self.__dict__, "_study": None, "_storage": None, "_numbers": {}, "_live": {}}

    @property
    def study(self) -> optuna.Study:
        """The study, created on first use or loaded from storage (a resumed search)."""
        if self._study is None:
            direction = "maximize" if self.mode == "max" else "minimize"
            self._storage = open_storage(self.storage)
            self._study = optuna.create_study(storage=self._storage, study_name=self.study_name,
                                              direction=direction, load_if_exists=True,
                                              sampler=self._sampler(self.seed))
            self._sid = self._storage.get_study_id_from_name(self.study_name)
            for t in self._study.get_trials(deepcopy=False):
                if RAY_ID in t.user_attrs:
                    self._numbers[t.user_attrs[RAY_ID]] = t.number
        return self._study

    def enqueue(self, first: list[tuple[dict, str]]) -> int:
        """Put `(params, where from)` first in the study (Optuna's `enqueue_trial`): the next trials asked
        take these values (and sample what they lack). Returns how many were enqueued."""
        for values, where in first:
            self.study.enqueue_trial(values, user_attrs={"enqueued_from": where}, skip_if_exists=True)
        return len(first)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Accept Tune's search properties: the metric and mode were given at construction, and the space
        is always our own."""
        return True

    def suggest(self, trial_id: str) -> dict | None:
        """Ask the study for a new trial's values, tagged with the Ray trial id."""
        if self.stop_when is not None and self.stop_when():
            return Searcher.FINISHED
        study = self.study
        # Seeded for the number this trial will get: an uninterrupted search and a resumed one propose the same.
        # Enqueued trials (a warm start) are numbered when enqueued and taken in that order, so the next number
        # is the count of trials already asked, not of all trials.
        asked = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
        study.sampler = self._sampler(trial_seed(self.seed, asked))
        trial = study.ask(self.distributions)
        trial.set_user_attr(RAY_ID, trial_id)
        self._numbers[trial_id] = trial.number
        self._live[trial.number] = trial
        return dict(trial.params)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return prior_sampler(self.priors, sampler(self.kind, seed, self.startup_trials), self.space, seed=seed,
                             startup_trials=self.startup_trials, **self.prior_options)

    def _trial(self, trial_id: str) -> optuna.Trial | None:
        """The running study trial of a Ray trial (re-attached through the storage after a resume)."""
        study = self.study  # loads the Ray id map on first use
        number = self._numbers.get(trial_id)
        if number is None:
            return None
        if number not in self._live:
            if study.get_trials(deepcopy=False)[number].state != TrialState.RUNNING:
                return None
            self._live[number] = optuna.Trial(study, self._storage.get_trial_id_from_study_id_trial_number(self._sid,
                                                                                                         number))
        return self._live[number]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Each epoch's accuracy becomes an intermediate value at step `epoch`."""
        self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict) -> None:
        trial = self._trial(trial_id)
        if trial is None or result.get("error") or result.get("diverged") or self.metric not in result:
            return
        step = int(result["epoch"])
        # One trial read from storage, not the whole study: a per-epoch read of every trial grew with the search.
        stored = self._storage.get_trial(self._storage.get_trial_id_from_study_id_trial_number(self._sid, trial.number))
        if step not in stored.intermediate_values:
            trial.report(float(result[self.metric]), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell the study how the trial ended: COMPLETE with its final accuracy, PRUNED, or FAIL."""
        trial = self._trial(trial_id)
        if trial is None:
            return
        state = outcome(result, error)
        if state != TrialState.FAIL:
            # Tune hands the result a scheduler stopped a trial on only to this method.
            self._report(trial_id, result)
        value = float(result[self.metric]) if state == TrialState.COMPLETE else None
        self.study.tell(trial.number, value, state=state)
        self._live.pop(trial.number, None)

    def abandon_unknown(self, ray_ids: set[str]) -> int:
        """Fail study trials still running that Ray no longer has (the driver died between asking the
        study and saving its own state); returns how many."""
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(RAY_ID) not in ray_ids:
                self.study.tell(t.number, state=TrialState.FAIL)
                n += 1
        return n

    def record_answer(self, answer: dict) -> None:
        """Store the confirmation's answer (winner's Ray id and study number, confirmed means, baseline, gain)
        as the study's user attribute `confirmed`."""
        winner = answer["winner"]["trial_id"]
        self.study  # noqa: B018  (loads the Ray id map)
        self.study.set_user_attr("confirmed", {**answer, "winner_number": self._numbers.get(winner)})

    def save(self, checkpoint_path: str) -> None:
        """The study is on disk already; Ray's checkpoint only records where."""
        Path(checkpoint_path).write_text(f"{self.storage}\n{self.study_name}\n")

    def restore(self, checkpoint_path: str) -> None:
        """Reload the study from storage (its trials carry their Ray ids)."""
        self._study, self._numbers, self._live = None, {}, {}
        self.study  # noqa: B018  (loads the study and the Ray id map)
