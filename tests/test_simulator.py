"""The search simulator (tune_sota.simulator) on a small synthetic table, with the real scheduler and
searcher code: a perfect searcher reaches zero regret, a blind one does not, and the product's own
ASHA and TPE run inside it."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from tests.conftest import ROOT
from tune_sota import simulator as sim


@pytest.fixture(scope="module")
def model():
    table = sim.synthetic_table(40, seed=0)
    return sim.Surrogate(table, sim.synthetic_space(), seed=0, trees=20, candidates=300)


def test_the_oracle_proposes_the_best_config_an_exhaustive_search_of_the_surrogate_finds(model):
    # every config the surrogate ranks, scored one by one through its own curve (model.mean), not its batch
    scored = [(model.mean(c)[2], i) for i, c in enumerate(model.candidates)]
    top, i_top = max(scored)
    assert model.best == pytest.approx(top, abs=1e-9)
    oracle = sim.simulate(model, sim.METHODS["oracle"], seed=0, workers=2, trials=4)
    assert [t_params(t, model) for t in oracle.trials] == [model.candidates[i_top]] * 4
    assert oracle.regret_after(4) == pytest.approx(0.0, abs=1e-9)
    worst = min(scored)[0]
    assert model.best - worst > 0.05  # the space has configs far from the best: a blind search pays for them


def test_regret_is_the_truth_of_the_trial_the_product_picks_by_what_it_saw(model):
    """After each ended trial the product picks the completed trial with the best observed (noisy) final
    accuracy; regret is the best's val/ accuracy less the pick's true one. Recomputed here from the trials."""
    for seed in range(3):
        blind = sim.simulate(model, sim.METHODS["random"], seed=seed, workers=2, trials=6)
        assert not any(t["stopped"] for t in blind.trials)  # fifo stops nothing
        for n in range(1, 7):
            pick = max(blind.trials[:n], key=lambda t: t["final"])  # in the order the trials ended
            assert blind.regret_after(n) == pytest.approx(model.best - pick["value"], abs=1e-12), (seed, n)
        assert blind.regret_after(6) > 1e-4, seed
    # where the noisy pick is not the truly best trial seen, the regret shows it (noise is part of the search)
    runs = [sim.simulate(model, sim.METHODS["random"], seed=s, workers=2, trials=6) for s in range(3, 12)]
    assert any(r.regret_after(6) > model.best - max(t["value"] for t in r.trials) + 1e-9 for r in runs)


def test_a_trials_seconds_are_its_epochs_and_the_search_spends_their_sum(model):
    run = sim.simulate(model, sim.METHODS["random"], seed=0, workers=2, trials=6)
    for t in run.trials:  # fifo: every trial runs its whole schedule, as run_seconds models it
        assert t["seconds"] == pytest.approx(model.run_seconds(t_params(t, model)))
        assert t["seconds"] == pytest.approx(float(np.sum(model.mean(t_params(t, model))[1])))
        assert t["epochs_run"] == t["epochs"] == model.enc.epochs(t_params(t, model))
    assert run.compute_after(6) == pytest.approx(sum(t["seconds"] for t in run.trials))
    assert run.compute_of(6) == pytest.approx(sum(t["seconds"] for t in run.trials))
    # two workers: the simulated wall clock is at least half the compute and at most all of it
    assert run.compute_after(6) / 2 - 1e-9 <= run.events[-1, 1] <= run.compute_after(6) + 1e-9


@pytest.mark.parametrize("name", ["tune_sota", "tpe+ray-asha", "ray-optuna+asha"])
def test_the_products_schedulers_and_searchers_drive_the_simulation(model, name):
    run = sim.simulate(model, sim.METHODS[name], seed=1, workers=2, trials=10)
    assert len(run.trials) == 10 and run.events[-1, 3] == 10
    assert any(t["stopped"] for t in run.trials), "ASHA stopped nothing on curves made to be cut"
    assert all(t["epochs_run"] <= t["epochs"] for t in run.trials)
    assert np.all(np.diff(run.events[:, 0]) >= 0)  # compute only grows
    assert math.isfinite(run.regret_after(10)) and run.regret_after(10) >= -1e-9
    # the searcher was told what Tune would tell it: ours PRUNED for a stop, Ray's OptunaSearch COMPLETE
    study = getattr(run.searcher, "study", None) or run.searcher._ot_study
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    n_stopped = sum(t["stopped"] for t in run.trials)
    if name == "ray-optuna+asha":
        assert states == {"COMPLETE": 10}
    else:
        assert states == {"COMPLETE": 10 - n_stopped, "PRUNED": n_stopped}
    # every stop saved compute: the search spent less than its trials' full schedules
    full = sum(float(np.sum(model.mean(t_params(t, model))[1])) for t in run.trials)
    assert run.compute_after(10) < full


def test_the_shipped_search_trains_every_trial_at_the_top_of_the_epochs_range_and_the_anchors_sample_it(model):
    top = max(sim.synthetic_space().searched["epochs"].args)
    shipped = sim.simulate(model, sim.METHODS["tune_sota"], seed=0, workers=2, trials=8)
    assert {t["epochs"] for t in shipped.trials} == {top}  # search.epochs: max, as search.run holds it
    assert "epochs" not in shipped.searcher.space  # so TPE spends its trials on the rest
    for name in ("random", "tune_sota-searched", "tpe+ray-asha"):
        run = sim.simulate(model, sim.METHODS[name], seed=0, workers=2, trials=8)
        assert len({t["epochs"] for t in run.trials}) > 1, name


def t_params(trial: dict, model) -> dict:
    return {k: trial[k] for k in model.enc.keys}


def test_surrogate_follows_the_table_and_measures_noise_from_replicates(model):
    assert 0.005 < model.noise["seed"] < 0.02  # the synthetic law's seed offset is 0.01
    rho, n = sim.heldout_spearman(sim.synthetic_table(40, seed=0), sim.synthetic_space(), folds=4)
    assert n == 40 and rho > 0.5


def test_iqm_and_its_intervals():
    x = [1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 2.5, 3.5]
    assert sim.iqm(x) == pytest.approx(np.mean([2.0, 2.5, 3.0, 3.5]))
    point, lo, hi = sim.iqm_interval(x)
    assert lo <= point <= hi
    r, lo, hi = sim.ratio_interval([1.0] * 8, [2.0] * 8)
    assert (r, lo, hi) == (0.5, 0.5, 0.5)
    assert sim.ratio_interval([1.0] * 8, [math.inf] * 8)[0] == 0.0
    # paired by seed: a constant shift under large seed-to-seed spread is resolved exactly, and the interval
    # of a noisy difference covers its mean
    spread = np.random.default_rng(0).normal(0, 5, 40)
    assert sim.paired_interval(spread + 1.0, spread) == pytest.approx((1.0, 1.0, 1.0))
    d, lo, hi = sim.paired_interval(spread, np.zeros(40))
    assert lo < d < hi and lo < 0 < hi


def test_confirmation_replay_buys_the_right_pick_and_costs_what_it_runs(model):
    """The confirmation replayed (simulator.confirm): none keeps the holdout's pick and costs nothing; many
    seeds of every completed trial find the search's best config; the cost counts each run, baseline's too."""
    run = sim.simulate(model, sim.METHODS["random"], seed=3, workers=2, trials=8)
    rng = np.random.default_rng(0)
    none = sim.confirm(model, run, 8, top=0, seeds=0, rng=rng)
    assert none["cost"] == 0 and none["regret"] == pytest.approx(run.regret_of(8))
    done = [t for t in run.first(8) if not t["stopped"]]
    quiet = sim.Surrogate.__new__(sim.Surrogate)  # the same model without val/ noise: the pick is certain
    quiet.__dict__.update(model.__dict__, noise={**model.noise, "val": 0.0})
    full = sim.confirm(quiet, run, 8, top=len(done), seeds=2, rng=rng)
    assert full["picked_best"] and full["regret"] == pytest.approx(model.best - max(t["value"] for t in done))
    one = sim.confirm(model, run, 8, top=1, seeds=3, rng=rng)
    best_holdout = max(done, key=lambda t: t["final"])
    assert one["regret"] == pytest.approx(model.best - best_holdout["value"])  # one candidate: nothing to choose
    # three seeds of the candidate and three of the baseline, each a whole run (what the trial itself spent)
    assert best_holdout["seconds"] == pytest.approx(model.run_seconds(t_params(best_holdout, model)))
    assert one["cost"] == pytest.approx(3 * (best_holdout["seconds"] + model.run_seconds(model.baseline())))
    assert one["share"] == pytest.approx(one["cost"] / run.compute_of(8))


def test_rungs_at_the_final_size_reach_the_simulation():
    """The 'final size' variant of the rungs is the product's ScheduleASHA option, driven by the stage the
    surrogate's curve is in: progressive-resizing trials are judged later, so fewer are cut at the rung."""
    table = sim.synthetic_table(40, seed=1)
    m = sim.Surrogate(table, sim.synthetic_space(), seed=0, trees=20, candidates=200)
    cut = {}
    for final in (False, True):
        method = sim.Method("random", "rungs", shares=(0.5,), final_size=final)
        runs = [sim.simulate(m, method, seed=s, workers=2, trials=12) for s in range(4)]
        prog = [t for r in runs for t in r.trials if t["resize"] == "16>32"]
        cut[final] = sum(t["stopped"] and t["epochs_run"] <= t["epochs"] // 2 for t in prog)
        assert method.label().startswith("asha rungs 50% rf 2" + (" final size" if final else ""))
    assert cut[True] == 0 < cut[False]


def test_searches_run_on_by_compute_get_equal_compute_and_cheap_trials_buy_more_of_them(model):
    budget = 20 * model.trial_seconds
    runs = {name: sim.simulate(model, sim.METHODS[name], seed=2, workers=2, trials=100, compute=budget)
            for name in ("random", "random+asha")}
    for name, run in runs.items():
        before_last_start = [t for t in run.trials if t["n"] < len(run.trials) - 2]
        assert sum(t["seconds"] for t in before_last_start) < budget, name  # no trial starts past the budget
        assert budget <= run.events[-1, 0] < budget + 3 * max(t["seconds"] for t in run.trials), name
    assert any(t["stopped"] for t in runs["random+asha"].trials)
    assert len(runs["random+asha"].trials) > len(runs["random"].trials)  # its stops paid for more trials


def test_the_committed_table_loads_and_fits_a_surrogate():
    """bench/curves/curves.csv.gz through the simulator's own loader: a drift between what
    bench/record_curves.py writes and what the simulator reads fails here, not in a bench run."""
    space, table = sim.load_table(ROOT / "bench" / "curves" / "curves.csv.gz")
    assert set(sim.TABLE_COLUMNS) | set(space.searched) <= set(table.columns)
    trials = table.drop_duplicates("trial_id")
    search = trials[trials.replicate_of.fillna("") == ""]
    assert len(search) >= 150 and (trials.replicate_of.fillna("") != "").sum() >= 3
    assert set(table.status) <= {"completed", "diverged", "error"} and (trials.status == "completed").sum() >= 150
    for key, d in space.searched.items():  # every recorded value is one the space allows, as the encoder reads it
        if d.kind == "choice":
            assert set(map(str, table[key].unique())) <= set(map(str, d.args)), key
        else:
            assert table[key].between(float(d.args[0]), float(d.args[1])).all(), key
    per_trial = table.groupby("trial_id").epoch.agg(["min", "max", "count"])
    assert (per_trial["min"] == 1).all() and (per_trial["max"] == per_trial["count"]).all()  # epochs 1..n
    planned = trials.set_index("trial_id").epochs.reindex(per_trial.index)
    done = (trials.set_index("trial_id").status == "completed").reindex(per_trial.index)
    assert (planned[done] == per_trial["max"][done]).all()  # a completed trial has a row for each planned epoch
    model = sim.Surrogate(table, space, seed=0, trees=10, candidates=200)
    assert model.noise["pairs"] >= 3  # measured from the replicates, not the defaults
    values = model.values(model.candidates)
    assert np.isfinite(values).all() and 0.1 < values.min() and values.max() < 1.0
    assert values.max() == pytest.approx(model.best)
    curve, seconds, value = model.mean(model.ranked[0])
    assert np.isfinite(curve).all() and (seconds > 0).all() and np.isfinite(model.trial_seconds)
