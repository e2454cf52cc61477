"""The candidates of issue 26 for beating random search, replayed on the first recorded table (seeds 0-49 decide):
noise-aware choice of the final trial, TPE's settings, a Latin-hypercube or incumbent-centred start, and smaller
spaces. Each line: the candidate's regret minus random search's, seed by seed, mean [bootstrap 95%] in points, at
12 trials x 2 workers and 32 x 4 (each search run to its trial budget, as `bench/simulate.py --budget-only`).

    python bench/simulate.py ...                        # the product's methods (random, tune_sota, focus, ...)
    python bench/sim_candidates.py --seeds 50           # these candidates (about 10 minutes on one core)

Candidates that are not product settings are put in here, around the product's own code: TPE's keyword
arguments through `searcher.sampler`, a start-up design or incumbent mixing around the study's sampler
(`StudySearcher._sampler`), a smaller space through `Method.min_trials` (config.hold_small) with the held values
taken from `baseline`. Nothing here is imported by the product.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH  # noqa: E402

from tune_sota import searcher  # noqa: E402
from tune_sota import simulator as sim
from tune_sota.config import BASELINE  # noqa: E402

TPE_OPTS: dict = {}  # TPESampler keyword arguments of the candidate being replayed
WRAP: list = []  # a sampler wrapper of the candidate: f(inner, study_searcher, trial_seed) -> sampler
_sampler, _study_sampler = searcher.sampler, searcher.StudySearcher._sampler


def _tpe(kind, seed, startup):
    if kind == "tpe" and TPE_OPTS:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, **TPE_OPTS)
    return _sampler(kind, seed, startup)


def _wrapped(self, seed):
    inner = _study_sampler(self, seed)
    return WRAP[0](inner, self, seed) if WRAP else inner


searcher.sampler, searcher.StudySearcher._sampler = _tpe, _wrapped


class _Around(optuna.samplers.BaseSampler):
    def __init__(self, inner):
        self.inner = inner

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, space):
        return self.inner.sample_relative(study, trial, space)

    def sample_independent(self, study, trial, name, dist):
        return self.inner.sample_independent(study, trial, name, dist)

    def before_trial(self, study, trial):
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)


class LatinStart(_Around):
    """The first `n` trials a Latin hypercube: each key's range cut into n strata, each taken once."""

    def __init__(self, inner, n, search_seed, trial_seed):
        super().__init__(inner)
        self.n, self.search_seed, self.rng = n, search_seed, np.random.default_rng(trial_seed)

    def sample_relative(self, study, trial, space):
        return {} if trial.number < self.n else self.inner.sample_relative(study, trial, space)

    def sample_independent(self, study, trial, name, dist):
        if trial.number >= self.n:
            return self.inner.sample_independent(study, trial, name, dist)
        perm = np.random.default_rng([self.search_seed, int.from_bytes(name.encode()[:8].ljust(8, b"\0"),
                                                                        "little") % 2**32]).permutation(self.n)
        u = (perm[trial.number] + self.rng.uniform()) / self.n
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
        if isinstance(dist, IntDistribution):
            return int(min(dist.high, dist.low + math.floor(u * (dist.high - dist.low + 1))))
        if dist.log:
            return float(math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low))))
        return float(dist.low + u * (dist.high - dist.low))


class IncumbentMix(_Around):
    """After the start-up: TPE's proposal with each key replaced by the best trial's value with probability p."""

    def __init__(self, inner, p, trial_seed):
        super().__init__(inner)
        self.p, self.rng = p, np.random.default_rng(trial_seed)

    def sample_relative(self, study, trial, space):
        rel = self.inner.sample_relative(study, trial, space)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not rel or not done:
            return rel
        inc = max(done, key=lambda t: t.value).params
        keys = [k for k in rel if k in inc]
        keep = [k for k in keys if self.rng.random() < self.p]
        if keys and len(keep) == len(keys):
            keep.remove(keys[int(self.rng.integers(len(keys)))])
        return {**rel, **{k: inc[k] for k in keep}}


# ---------------------------------------------------------------- the choice among a search's completed trials


def _features(model, done):
    X = np.array([model.enc.row(t) for t in done])
    sd = X.std(0)
    return (X - X.mean(0)) / np.where(sd > 0, sd, 1), np.array([t["final"] for t in done])


def _gp(model, done, *, ard=True, noise=None):
    """The completed trial whose holdout accuracy a Gaussian process (Matern 5/2, fitted noise or the replicates')
    predicts highest: its value smoothed by its neighbours'."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    X, y = _features(model, done)
    length = np.ones(X.shape[1]) * 3 if ard else 3.0
    k = ConstantKernel(1.0) * Matern(length_scale=length, nu=2.5, length_scale_bounds=(0.1, 100))
    if noise is None:
        gp = GaussianProcessRegressor(k + WhiteKernel(0.2, (1e-3, 10)), normalize_y=True, random_state=0)
    else:
        gp = GaussianProcessRegressor(k, alpha=(noise / (y.std() or 1)) ** 2, normalize_y=True, random_state=0)
    return done[int(np.argmax(gp.fit(X, y).predict(X)))]


def _neighbours(model, done, h=1.0):
    X, y = _features(model, done)
    w = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / X.shape[1] / (2 * h * h))
    np.fill_diagonal(w, 0)
    return done[int(np.argmax((y + 0.5 * (w * y[None]).sum(1)) / (1 + 0.5 * w.sum(1))))]


CHOICES = {
    "raw": None,  # the product's: the best final holdout accuracy
    "gp": lambda m, d: _gp(m, d),
    "gp-isotropic": lambda m, d: _gp(m, d, ard=False),
    "gp-replicate-noise": lambda m, d: _gp(m, d, noise=m.noise["seed"]),
    "neighbours": _neighbours,
}


def regret(model, run, budget, choice) -> float:
    done = [t for t in run.first(budget) if not t["stopped"]]
    if not done:
        return math.inf
    pick = max(done, key=lambda t: t["final"]) if CHOICES[choice] is None or len(done) < 4 else \
        CHOICES[choice](model, done)
    return 100 * (model.best - pick["value"])


# ---------------------------------------------------------------- the candidates

M, SHIP = sim.Method, sim.METHODS["tune_sota"]
REST = ("mixup", "label_smoothing", "resize", "opt", "sched", "act", "sa")  # all but lr, epochs, augment
PRIORS = {"mixup": 0.0, "label_smoothing": 0.1, "resize": "16>32", "opt": "ranger", "sched": "flat_cos",
          "act": "mish", "sa": True}  # bench/curves/space.yaml's priors of those keys


def _held(keys, n=1000):
    return tuple((k, n) for k in keys)


def _g(share):
    return lambda n: min(math.ceil(share * n), 25)


# name: (method, TPE keyword arguments, sampler wrapper, held values (baseline) or None, choice rules, settings)
CANDIDATES = {
    "random": (sim.METHODS["random"], {}, None, None, tuple(CHOICES), None),
    "shipped": (SHIP, {}, None, None, tuple(CHOICES), None),
    "constant_liar off": (SHIP, {"constant_liar": False}, None, None, ("raw",), None),
    "multivariate off": (SHIP, {"multivariate": False}, None, None, ("raw",), None),
    "multivariate, group, constant_liar on": (SHIP, {"multivariate": True, "group": True, "constant_liar": True},
                                              None, None, ("raw",), None),
    "2 start-up": (M("tpe", "asha", startup=2), {}, None, None, ("raw",), None),
    "3 start-up": (M("tpe", "asha", startup=3), {}, None, None, ("raw",), ["12x2"]),
    "6 start-up": (M("tpe", "asha", startup=6), {}, None, None, ("raw",), None),
    "8 start-up": (M("tpe", "asha", startup=8), {}, None, None, ("raw", "gp"), None),
    "12 start-up": (M("tpe", "asha", startup=12), {}, None, None, ("raw",), ["32x4"]),
    "16 start-up": (M("tpe", "asha", startup=16), {}, None, None, ("raw",), ["32x4"]),
    "gamma 0.2n": (SHIP, {"gamma": _g(0.2)}, None, None, ("raw",), None),
    "gamma 0.25n": (SHIP, {"gamma": _g(0.25)}, None, None, ("raw",), None),
    "gamma 0.33n": (SHIP, {"gamma": _g(0.33)}, None, None, ("raw",), None),
    "prior_weight 2": (SHIP, {"prior_weight": 2.0}, None, None, ("raw",), None),
    "n_ei_candidates 8": (SHIP, {"n_ei_candidates": 8}, None, None, ("raw",), None),
    "Latin hypercube start-up (4)": (SHIP, {}, lambda i, s, seed: LatinStart(i, s.startup_trials, s.seed, seed),
                                     None, ("raw",), None),
    "Latin hypercube start-up (6)": (M("tpe", "asha", startup=6), {},
                                     lambda i, s, seed: LatinStart(i, s.startup_trials, s.seed, seed), None,
                                     ("raw",), None),
    "incumbent mix p 0.5": (SHIP, {}, lambda i, s, seed: IncumbentMix(i, 0.5, seed), None, ("raw",), None),
    "incumbent mix p 0.75": (SHIP, {}, lambda i, s, seed: IncumbentMix(i, 0.75, seed), None, ("raw",), None),
    # smaller spaces: the keys named held at the values given (the rest of BASELINE where not given)
    "lr, epochs, augment; rest baseline": (M("tpe", "asha", min_trials=_held(REST)), {}, None,
                                           {"resize": "32"}, ("raw",), None),
    "lr, epochs, augment; rest baseline, label smoothing 0.1": (M("tpe", "asha", min_trials=_held(REST)), {}, None,
                                                                {"resize": "32", "label_smoothing": 0.1},
                                                                ("raw",), None),
    "lr, epochs, augment; rest the experts' priors": (M("tpe", "asha", min_trials=_held(REST)), {}, None, PRIORS,
                                                      ("raw",), None),
    "random: lr, epochs, augment; rest baseline": (M("random", "fifo", min_trials=_held(REST)), {}, None,
                                                   {"resize": "32"}, ("raw",), None),
    "imagenette-cpu's six (opt, sched, act, sa at baseline)": (M("tpe", "asha", min_trials=_held(
        ("opt", "sched", "act", "sa"))), {}, None, {}, ("raw",), None),
    "lr, epochs, resize, augment (act relu)": (M("tpe", "asha", min_trials=_held(
        ("mixup", "label_smoothing", "opt", "sched", "act", "sa"))), {}, None, {}, ("raw",), None),
    "lr, epochs, label_smoothing, resize, augment (act relu)": (M("tpe", "asha", min_trials=_held(
        ("mixup", "opt", "sched", "act", "sa"))), {}, None, {}, ("raw",), None),
    "focus: lr, epochs, resize, augment, act (sim.FOCUS)": (sim.METHODS["focus"], {}, None, {}, ("raw", "gp"), None),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--table", default=str(BENCH / "curves" / "curves.csv.gz"))
    ap.add_argument("--only", default="", help="comma-separated candidate names (default all)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, frame = sim.load_table(args.table)
    model = sim.Surrogate(frame, space, seed=0)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    settings = {"12x2": (12, 2), "32x4": (32, 4)}
    base: dict[str, np.ndarray] = {}
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    print(f"{args.table}, seeds {seeds.start}-{seeds.stop - 1}: regret minus random search's, same seeds, "
          f"mean [95%], points")
    for name in ["random", *[n for n in names if n != "random"]]:
        method, opts, wrap, held, choices, only = CANDIDATES[name]
        TPE_OPTS.clear()
        TPE_OPTS.update(opts)
        WRAP[:] = [wrap] if wrap else []
        model.space = dataclasses.replace(space, baseline={**BASELINE, **(held or {})})
        t0, cells = time.perf_counter(), []
        for tag, (n, w) in settings.items():
            if only and tag not in only:
                continue
            runs = [sim.simulate(model, method, seed=s, workers=w, trials=n) for s in seeds]
            for c in choices:
                r = np.array([regret(model, run, n, c) for run in runs])
                if name == "random" and c == "raw":
                    base[tag] = r
                d = sim.paired_interval(r, base[tag])
                cells.append(f"{tag}{'' if c == 'raw' else f' ({c} choice)'} {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]")
        print(f"- {name} ({time.perf_counter() - t0:.0f} s): " + "; ".join(cells), flush=True)
    model.space = space
    return 0


if __name__ == "__main__":
    sys.exit(main())
