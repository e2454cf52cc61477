"""Experts' priors (issue 26): they parse beside a distribution, with one-line errors, and round-trip through
the YAML a search writes; the prior sampler (real Optuna) starts at the experts' pick, concentrates its
early proposals near the priors and lets go as trials accrue; a wrong prior reaches the simulation."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tune_sota import priors
from tune_sota import simulator as sim
from tune_sota.config import ConfigError, Dist, load_space, parse_space, space_to_yaml
from tune_sota.searcher import StudySearcher, study_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_priors_parse_beside_their_distribution_and_round_trip():
    space = parse_space({"data": "digits", "size": 32,
                         "lr": {"loguniform": [1e-3, 6e-2], "prior": 3e-3, "confidence": 0.75},
                         "epochs": {"randint": [2, 8], "prior": 5},
                         "resize": {"choice": ["32", "16>32"], "prior": "16>32", "confidence": 0.25},
                         "mixup": {"choice": [0.0, 0.2], "prior": 0}})
    s = space.searched
    assert s["lr"] == Dist("loguniform", (1e-3, 6e-2), prior=3e-3, confidence=0.75)
    assert s["epochs"].prior == 5 and s["epochs"].confidence == 0.5  # medium unless said
    assert s["resize"].prior == "16>32" and s["mixup"].prior == 0.0  # the choice's own value
    again = parse_space(yaml.safe_load(space_to_yaml(space.values, space.search)))
    assert again.searched == s and again.search.priors == "off"
    # what the search writes as results/NAME/space.yaml reads back with its priors
    assert parse_space(yaml.safe_load(space_to_yaml(space.values, space.search.__class__(priors="pibo")))).searched == s


@pytest.mark.parametrize("raw, expected", [
    ({"lr": {"loguniform": [1e-3, 1e-2], "prior": 0.5}},
     "lr: prior 0.5 is not allowed; must be a number in [0.001, 0.01]"),
    ({"resize": {"choice": ["32", "16>32"], "prior": "8>32"}},
     "resize: prior '8>32' is not one of the choices: 32, 16>32"),
    ({"epochs": {"randint": [2, 8], "prior": 4.5}}, "epochs: prior 4.5 is not an integer in [2, 8]"),
    ({"lr": {"loguniform": [1e-3, 1e-2], "confidence": 0.5}}, "lr: confidence needs a prior beside it"),
    ({"lr": {"loguniform": [1e-3, 1e-2], "prior": 3e-3, "confidence": 1.5}},
     "lr: confidence 1.5 is not allowed; must be a number in (0, 1)"),
    ({"lr": {"loguniform": [1e-3, 1e-2], "priorr": 3e-3}}, "lr: a distribution is one key"),
    ({"search": {"priors": "yes"}}, "search.priors: 'yes' is not allowed; must be one of off, first, pibo"),
])
def test_a_bad_prior_names_key_and_allowed(raw, expected):
    with pytest.raises(ConfigError) as e:
        parse_space({"data": "digits", **raw})
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_every_shipped_space_declares_priors_inside_its_ranges():
    for name in ("quick", "imagenette-cpu", "imagenette-cpu-wide", "imagenette", "imagenette-5ep"):
        space = load_space(name)
        declared = priors.pick(space.searched)
        assert {"lr", "label_smoothing", "mixup"} <= set(declared), name
        assert space.search.priors == "off", name  # the mechanism is there; the simulator did not adopt it
        space.resolve({k: d.prior if d.prior is not None else d.args[0] for k, d in space.searched.items()})


SPACE = {"lr": Dist("loguniform", (1e-4, 1.0), prior=1e-2, confidence=0.9),
         "opt": Dist("choice", ("a", "b", "c", "d"), prior="b", confidence=0.9),
         "wd": Dist("uniform", (0.0, 1.0))}  # no prior: left to the base sampler


def _study(n: int, seed: int = 0) -> optuna.Study:
    """A study with `n` finished trials spread uniformly and scored at random: nothing for TPE to learn."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    rng = np.random.default_rng(seed)
    dists = {k: optuna.distributions.CategoricalDistribution(list(d.args)) if d.kind == "choice" else
             optuna.distributions.FloatDistribution(*d.args, log=d.kind == "loguniform") for k, d in SPACE.items()}
    for _ in range(n):
        t = study.ask(dists)
        study.tell(t, float(rng.uniform()))
    return study, dists


def _near_prior(study, dists, sampler, asks: int) -> float:
    """Share of `asks` proposals of `sampler` with opt at the prior and lr within a factor 3 of it."""
    study.sampler = sampler
    hits = 0
    for _ in range(asks):
        t = study.ask(dists)
        hits += t.params["opt"] == "b"
        hits += abs(math.log10(t.params["lr"] / 1e-2)) < math.log10(3)
    return hits / (2 * asks)


def test_the_prior_sampler_starts_at_the_pick_then_concentrates_near_the_priors():
    study, dists = _study(0)
    base = optuna.samplers.TPESampler(seed=1, n_startup_trials=1000)
    first = study.ask(dists)
    assert first.number == 0
    study2, _ = _study(0)
    study2.sampler = priors.PriorSampler(base, SPACE, seed=1, startup_trials=1000, mix=1.0)
    t = study2.ask(dists)
    assert t.params["lr"] == pytest.approx(1e-2) and t.params["opt"] == "b"  # the experts' pick first
    near = _near_prior(study2, dists, priors.PriorSampler(base, SPACE, seed=2, startup_trials=1000, mix=1.0), 60)
    uniform = _near_prior(*_study(0, seed=3), optuna.samplers.TPESampler(seed=2, n_startup_trials=1000), 60)
    assert near > 0.75 and uniform < 0.35, (near, uniform)
    assert all(0.0 <= tr.params["wd"] <= 1.0 for tr in study2.trials)


def test_the_priors_weight_decays_as_trials_accrue():
    """Past the start-up, a trial comes from the priors at rate mix * startup / n and TPE's proposals are
    drawn by prior^(beta/n): much of the time after 4 trials, hardly ever after 150."""
    early, dists = _study(4)
    late, _ = _study(150)

    def make(seed):
        return priors.PriorSampler(optuna.samplers.TPESampler(seed=seed, n_startup_trials=2), SPACE, seed=seed,
                                   startup_trials=2, mix=1.0)

    at_4 = _near_prior(early, dists, make(5), 60)
    at_150 = _near_prior(late, dists, make(5), 60)
    plain_4 = _near_prior(*_study(4), optuna.samplers.TPESampler(seed=5, n_startup_trials=2), 60)
    plain_150 = _near_prior(*_study(150), optuna.samplers.TPESampler(seed=5, n_startup_trials=2), 60)
    assert at_4 > 0.35 and at_4 > plain_4 + 0.15, (at_4, plain_4)
    assert at_150 < at_4 - 0.15 and abs(at_150 - plain_150) < 0.15, (at_4, at_150, plain_150)


def test_the_searcher_uses_the_spaces_priors_only_when_asked(tmp_path):
    space = {**SPACE}
    on = StudySearcher(space, storage=study_url(tmp_path, ""), study_name="on", metric="accuracy", mode="max",
                       seed=0, startup_trials=4, priors="pibo")
    off = StudySearcher(space, storage=study_url(tmp_path, ""), study_name="off", metric="accuracy", mode="max",
                        seed=0, startup_trials=4)
    first = on.suggest("a")
    assert first["lr"] == 1e-2 and first["opt"] == "b" and 0 <= first["wd"] <= 1
    assert off.suggest("a")["lr"] != 1e-2
    assert {t.state for t in on.study.trials} == {TrialState.RUNNING}
    # 'first': the experts' pick first, then exactly what the search would have proposed without priors
    first = StudySearcher(space, storage=study_url(tmp_path, ""), study_name="first", metric="accuracy",
                          mode="max", seed=0, startup_trials=4, priors="first")
    pick = first.suggest("a")
    assert (pick["lr"], pick["opt"]) == (1e-2, "b")
    assert [first.suggest(t) for t in "bc"] == [off.suggest(t) for t in "bc"]


def test_a_wrong_prior_is_the_worst_corner_and_reaches_the_simulated_searcher():
    model = sim.Surrogate(sim.synthetic_table(40, seed=0), sim.synthetic_space(), seed=0, trees=20, candidates=300)
    # the shipped search holds epochs at the top of its range (8): the corner is the worst among the rest
    corner = sim.worst_corner(model, {"epochs": 8})
    assert corner["epochs"] == 8 and sim.method_space(model, sim.METHODS["priors-wrong"])[1] == {"epochs": 8}
    assert model.values([corner])[0] < np.percentile(model.values(model.candidates), 10)
    assert model.values([sim.worst_corner(model)])[0] <= model.values([corner])[0]  # epochs free: worse still
    run = sim.simulate(model, sim.METHODS["priors-wrong"], seed=0, workers=2, trials=6)
    first = min(run.trials, key=lambda t: t["n"])
    assert {k: first[k] for k in corner} == corner  # the wrong pick is what the search tried first
    assert run.searcher.priors == "pibo" and priors.pick(run.searcher.space) == {k: corner[k] for k in corner
                                                                                  if k != "epochs"}
