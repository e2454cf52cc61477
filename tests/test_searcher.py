"""The Optuna searcher driven directly through Ray's Searcher interface, with its study in SQLite:
what each way of ending reaches the study as, and a restore from storage. Real Optuna, no search."""

from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.trial import TrialState

from tune_sota.config import Dist
from tune_sota.searcher import RAY_ID, StudySearcher, study_url

SPACE = {"lr": Dist("loguniform", (1e-3, 1e-1)), "epochs": Dist("randint", (2, 4)),
         "resize": Dist("choice", ("16", "8>16"))}


@pytest.fixture
def searcher(tmp_path):
    return StudySearcher(SPACE, storage=study_url(tmp_path), study_name="s", metric="accuracy", mode="max",
                         seed=1, startup_trials=2)


def _epochs(s, trial_id, epochs, upto):
    for e in range(1, upto + 1):
        s.on_trial_result(trial_id, {"epoch": e, "epochs": epochs, "accuracy": 0.1 * e, "training_iteration": e})
    return {"epoch": upto, "epochs": epochs, "accuracy": 0.1 * upto, "error": "", "diverged": False}


def test_each_ending_reaches_the_study_as_it_happened(searcher, tmp_path):
    configs = {t: searcher.suggest(t) for t in ("done", "pruned", "failed", "nan", "raised")}
    assert set(configs["done"]) == set(SPACE) and 2 <= configs["done"]["epochs"] <= 4
    searcher.on_trial_complete("done", _epochs(searcher, "done", 3, 3))
    last = _epochs(searcher, "pruned", 4, 1)
    searcher.on_trial_complete("pruned", {**last, "epoch": 2, "accuracy": 0.2})  # the stop result comes only here
    searcher.on_trial_complete("failed", {**_epochs(searcher, "failed", 3, 1), "error": "OSError: truncated"})
    searcher.on_trial_complete("nan", {**_epochs(searcher, "nan", 3, 1), "diverged": True})
    searcher.on_trial_complete("raised", None, error=True)
    study = optuna.load_study(study_name="s", storage=study_url(tmp_path))
    by_ray = {t.user_attrs[RAY_ID]: t for t in study.trials}
    assert by_ray["done"].state == TrialState.COMPLETE and by_ray["done"].value == pytest.approx(0.3)
    assert by_ray["done"].intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert by_ray["pruned"].state == TrialState.PRUNED
    assert by_ray["pruned"].intermediate_values == pytest.approx({1: 0.1, 2: 0.2})
    assert {by_ray[t].state for t in ("failed", "nan", "raised")} == {TrialState.FAIL}
    assert by_ray["done"].params == configs["done"]


def test_restored_searcher_carries_on_with_the_same_study(searcher, tmp_path):
    searcher.suggest("a")
    searcher.on_trial_complete("a", _epochs(searcher, "a", 2, 2))
    searcher.suggest("b")
    _epochs(searcher, "b", 4, 1)
    searcher.suggest("orphan")  # asked, but the driver died before Ray saved the trial
    # What Tuner.restore does: unpickle the searcher object, then restore it from its checkpoint file.
    again = pickle.loads(pickle.dumps(searcher))
    searcher.save(str(tmp_path / "searcher.pkl"))
    again.restore(str(tmp_path / "searcher.pkl"))
    for e in (2, 3, 4):  # "b" goes on from its checkpoint
        again.on_trial_result("b", {"epoch": e, "epochs": 4, "accuracy": 0.1 * e})
    again.on_trial_complete("b", {"epoch": 4, "epochs": 4, "accuracy": 0.4})
    again.suggest("c")
    assert again.abandon_unknown({"a", "b", "c"}) == 1
    study = optuna.load_study(study_name="s", storage=study_url(tmp_path))
    states = {t.user_attrs[RAY_ID]: (t.number, t.state) for t in study.trials}
    assert states == {"a": (0, TrialState.COMPLETE), "b": (1, TrialState.COMPLETE), "orphan": (2, TrialState.FAIL),
                      "c": (3, TrialState.RUNNING)}
    assert study.trials[1].intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})
    again.record_answer({"winner": {"trial_id": "b", "accuracy_mean": 0.9}, "gain_points": 2.5})
    confirmed = optuna.load_study(study_name="s", storage=study_url(tmp_path)).user_attrs["confirmed"]
    assert confirmed["winner_number"] == 1 and confirmed["gain_points"] == 2.5


@pytest.mark.parametrize("kind", ["tpe", "gp", "random"])
def test_a_resumed_searcher_proposes_what_an_uninterrupted_one_would_never_a_repeat(tmp_path, kind):
    """A searcher rebuilt on the same study (a resumed search) once restarted its seeded start-up proposals:
    trial 3 repeated trial 0's config. Each proposal now depends on the seed and the trial's number."""
    def make(path):
        return StudySearcher(SPACE, storage=study_url(path), study_name="s", metric="accuracy", mode="max",
                             kind=kind, seed=7, startup_trials=6)

    for d in ("whole", "cut"):
        (tmp_path / d).mkdir()
    whole = make(tmp_path / "whole")
    straight = [whole.suggest(f"t{i}") for i in range(6)]
    first = make(tmp_path / "cut")
    cut = [first.suggest(f"t{i}") for i in range(3)]
    resumed = pickle.loads(pickle.dumps(first))  # as Ray restores it: the study comes back from storage
    resumed.restore(str(tmp_path / "ckpt"))
    cut += [resumed.suggest(f"t{i}") for i in range(3, 6)]
    assert cut == straight
    assert len({tuple(sorted(c.items())) for c in cut}) == 6, cut


def test_enqueued_trials_sample_what_they_lack_each_with_its_own_seed(tmp_path):
    """A warm start enqueues partial configs; each enqueued trial samples the keys it lacks with the seed of
    its own number (they once all shared one, so every warm-started trial drew the same values)."""
    space = {**SPACE, "label_smoothing": Dist("uniform", (0.0, 0.2))}  # continuous: distinct draws never tie
    s = StudySearcher(space, storage=study_url(tmp_path), study_name="s", metric="accuracy", mode="max",
                      kind="random", seed=3, startup_trials=8)
    s.enqueue([({"lr": 0.01}, "a"), ({"lr": 0.02}, "b"), ({"lr": 0.03}, "c")])
    enqueued = [s.suggest(f"t{i}") for i in range(3)]
    assert [g["lr"] for g in enqueued] == [0.01, 0.02, 0.03]
    assert len({g["label_smoothing"] for g in enqueued}) == 3, enqueued  # the enqueued trials only
    after = s.suggest("t3")  # the first trial not enqueued samples everything
    assert after["lr"] not in (0.01, 0.02, 0.03) and 1e-3 <= after["lr"] <= 1e-1
    from_ = {t.number: t.user_attrs.get("enqueued_from") for t in s.study.trials}
    assert from_ == {0: "a", 1: "b", 2: "c", 3: None}
