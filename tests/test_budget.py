"""A search sized in hours and started from what is known: `--time-budget` (budget.py), `--warm-start` and
`search.baseline_first` (warmstart.py), on a folder without val/ (its split recorded in the results), with
the winner exported beside best.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import cli, tiny, write_space
from test_layouts import class_folders

from tune_sota.config import ConfigError, parse_duration, parse_space


@pytest.mark.parametrize("text,seconds", [("8h", 28800), ("90m", 5400), ("40s", 40), ("1h30m", 5400), ("2.5h", 9000),
                                          ("1d", 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "8", "h", "8x", "-1h", "0s", "1h 2"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)
    if text:
        with pytest.raises(ConfigError, match="time_budget: .* a duration such as 8h, 90m, 40s"):
            parse_space({"data": "digits", "search": {"time_budget": text}})


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    """A search whose budget (1 s) is spent before its first epoch ends: the two trials running then stop at
    their first checkpoint, nothing else starts. Its first trial is the baseline (baseline_first), whose one
    epoch completes it, so the confirmation has something to run. Seed 3: the sampler draws three epochs for
    the trials after it (numbers 1 and 2), so the budget, not their schedule, ends them (the draws depend on
    the seed and the trial's number only, searcher.trial_seed). So its epochs are sampled (`search.epochs:
    searched`): held at their top, the baseline would train 3 epochs too and be cut like the others."""
    tmp = tmp_path_factory.mktemp("budget")
    data = class_folders(tmp / "pets", per_class=16)
    space = write_space(tmp / "b.yaml", {
        **tiny(data), "lr": {"loguniform": [1.0e-3, 3.0e-2]}, "mixup": {"choice": [0.0, 0.2]},
        "epochs": {"choice": [1, 3]}, "baseline": {"epochs": 1}}, {
        "num_samples": 20, "max_concurrent": 2, "cpus_per_trial": 1, "scheduler": "fifo", "startup_trials": 2,
        "confirm_top": 1, "confirm_seeds": 1, "baseline_first": True, "seed": 3, "epochs": "searched"})
    run = cli("search", "--space", space, "--results", tmp / "results", "--time-budget", "1s")
    return tmp, run


@pytest.mark.slow
def test_a_time_budget_ends_a_search_early_and_the_confirmation_still_runs(budgeted):
    tmp, run = budgeted
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = tmp / "results" / "b"
    trials = pd.read_csv(res / "trials.csv")
    assert len(trials) <= 3 < 20  # the two running when it was spent, at most one created before then
    status = trials.status.value_counts().to_dict()
    assert set(status) <= {"completed", "out_of_time", "not_started"}, trials[["status", "epochs_run"]]
    assert status.get("completed") == 1 and status.get("out_of_time", 0) >= 1, trials[["status", "epochs_run"]]
    base = trials[(trials.lr.sub(3e-3).abs() < 1e-12) & (trials.mixup == 0.0)]
    assert len(base) == 1 and base.status.iloc[0] == "completed"  # the baseline went first, and finished
    cut = trials[trials.status == "out_of_time"]
    assert ((cut.epochs_run >= 1) & (cut.epochs_run < cut.epochs)).all(), cut  # stopped at a checkpoint, early
    assert "time budget 00h00m01s spent after" in run.stdout and "the confirmation after them" in run.stdout
    best = yaml.safe_load((res / "best.yaml").read_text())
    assert best["result"]["time_budget"]["spent"] and best["result"]["time_budget"]["confirm_s"] > 0
    assert len(pd.read_csv(res / "confirm.csv"))  # the confirmation ran
    # the split the search drew (no val/ in the data) is in its results, and the winner is exported beside it
    split = pd.read_csv(res / "split.csv")
    assert (split.split == "val").sum() == 9 and len(split) == 48
    assert {"export.pkl", "model.pt2", "classes.json"} <= {p.name for p in (res / "export").iterdir()}
    assert "export.pkl, model.pt2" in run.stdout


@pytest.mark.slow
def test_a_warm_start_enqueues_the_earlier_winners_first_clipped_to_the_new_space(budgeted):
    tmp, _ = budgeted
    earlier = pd.read_csv(tmp / "results" / "b" / "trials.csv")
    done = earlier[earlier.status == "completed"]
    space = write_space(tmp / "w.yaml", {
        **tiny(class_folders(tmp / "more", per_class=10)), "lr": {"loguniform": [5.0e-3, 1.0e-2]},
        "mixup": {"choice": [0.0, 0.1]}, "label_smoothing": {"uniform": [0.0, 0.1]}}, {
        "num_samples": len(done) + 1, "max_concurrent": 1, "cpus_per_trial": 1, "scheduler": "fifo",
        "confirm_top": 0})
    run = cli("search", "--space", space, "--results", tmp / "results", "--warm-start", tmp / "results" / "b")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{tmp / 'results' / 'w' / 'study.db'}")
    first = sorted(study.get_trials(), key=lambda t: t.number)[:len(done)]
    assert all(str(tmp / "results" / "b") in t.user_attrs["enqueued_from"] for t in first)
    for t, (_, row) in zip(first, done.iterrows()):  # the earlier completed trials, best first, in order
        assert math.isclose(t.params["lr"], min(max(row.lr, 5e-3), 1e-2))
        assert t.params["mixup"] == (0.0 if row.mixup == 0.0 else 0.1)  # 0.2 -> the nearest choice
        assert 0.0 <= t.params["label_smoothing"] <= 0.1  # not in the earlier search: sampled
    assert "warm start" in run.stdout and "clipped to" in run.stdout  # each change is said
    assert "epochs" not in first[0].params  # not searched here: ignored


def test_warm_start_values_are_fitted_to_the_new_space():
    from tune_sota.config import Dist
    from tune_sota.warmstart import fit

    lr = Dist("loguniform", (1e-3, 1e-2))
    assert fit("lr", 0.05, lr) == (0.01, "lr 0.05 is outside [0.001, 0.01]: clipped to 0.01")
    assert fit("lr", 0.005, Dist("loguniform", (1e-3, 1e-2))) == (0.005, None)
    assert fit("epochs", 9.0, Dist("randint", (2, 5)))[0] == 5
    assert fit("mixup", 0.3, Dist("choice", (0.0, 0.2, 0.4)))[0] == 0.2  # the nearest choice, named
    assert fit("resize", 32, Dist("choice", ("32", "16>32"))) == ("32", None)  # a CSV's number is the text choice
    assert fit("resize", "8>16", Dist("choice", ("32", "16>32"))) == (None, "resize '8>16' is not one of "
                                                                              "['32', '16>32']: sampled instead")


def test_one_budget_per_search_whatever_ray_pickles(tmp_path):
    """Ray pickles the scheduler, the stopper and the searcher's `is_spent` apart: each copy is the one live
    budget, and a new process (a resumed search) goes on with the clock and the stops saved in budget.json."""
    import pickle

    from ray.tune.schedulers import FIFOScheduler

    from tune_sota import budget, runstate

    state = runstate.state_file(tmp_path, "budget.json")
    b = budget.TimeBudget(FIFOScheduler(), 3600, state)
    stop = budget.BudgetStop(b)
    b.used, b.spent_after = 4000.0, 3600.0
    b.out_of_time.add("t1")
    b._save()
    assert pickle.loads(pickle.dumps(stop)).budget is b and pickle.loads(pickle.dumps(b.is_spent))() is True
    blob = pickle.dumps(b)
    budget._LIVE.clear()  # as in the process that resumes the search
    again = pickle.loads(blob)
    assert again is not b and again.used == 4000.0 and again.spent_after == 3600.0 and again.out_of_time == {"t1"}
    assert budget.live(state) is again and pickle.loads(pickle.dumps(stop)).budget is again
    # a budget pickled by a search from before state/ existed, its file at the top: it moves into state/
    legacy = tmp_path / "old" / "budget.json"
    legacy.parent.mkdir()
    Path(state).replace(legacy)
    b.state_file = str(legacy)
    blob = pickle.dumps(b)
    budget._LIVE.clear()
    moved = pickle.loads(blob)
    assert moved.state_file == runstate.state_file(legacy.parent, "budget.json") and moved.used == 4000.0
    assert not legacy.exists() and Path(moved.state_file).is_file()


def test_a_spent_budget_stops_a_trial_at_the_end_of_its_epoch_but_not_one_that_has_ended(tmp_path):
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from tune_sota import budget

    b = budget.TimeBudget(FIFOScheduler(), 1, str(tmp_path / "budget.json"))
    b.used = 5.0
    assert b.on_trial_result(None, _Trial("a"), {"epoch": 2, "epochs": 4}) == TrialScheduler.STOP
    assert b.on_trial_result(None, _Trial("b"), {"epoch": 4, "epochs": 4}) == TrialScheduler.CONTINUE
    assert b.out_of_time == {"a"}


class _Trial:  # what the budget reads of Ray's Trial: its id
    def __init__(self, trial_id):
        self.trial_id = trial_id
