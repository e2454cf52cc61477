"""Experts' priors in the search (issue 26): a space may say, beside a distribution, what an expert would
pick and how sure they are (`lr: {loguniform: [1.0e-3, 6.0e-2], prior: 3.0e-3, confidence: 0.5}`).

Neither Optuna nor Ray Tune has priors, so `PriorSampler` is a small sampler on Optuna's public
`BaseSampler` interface around the product's own (TPE after random start-up trials). It follows πBO
(Hvarfner et al., ICLR 2022) and PriorBand (Mallik et al., NeurIPS 2023):

- the first trial of a study is the experts' pick itself (every key with a prior at it);
- each start-up trial is drawn from the priors with probability `mix`, else uniformly as before (PriorBand's
  mix of prior and uniform samples): a wrong prior costs at most that share of the random start-up;
- after the start-up, with n trials finished, a trial is drawn from the priors with probability
  mix * startup / n, a share that falls as trials accrue, and otherwise its values are TPE's: one of
  `candidates` proposals of TPE, drawn with probability proportional to prior(x)^(beta/n) (πBO's decaying
  weight; with beta/n -> 0 every proposal weighs the same and this is TPE). Re-weighting TPE's own
  proposals alone moves little: once TPE has a favourite, its proposals all sit near it.

A prior is a density on the value's place in its range (the log of it for loguniform): a normal around
the pick with standard deviation `spread(confidence)` of the range, cut at the ends; for a choice, the
pick gets 1/k + confidence * (1 - 1/k) of the probability and the others share the rest.
"""

from __future__ import annotations

import math

import numpy as np
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import TrialState

from tune_sota.config import Dist

# Chosen on the recorded curves (README, "What the defaults rest on"): with a deliberately wrong prior, mix 0.5 and
# beta 2 cost 1.3 points at 32 trials against no prior; mix 0.25 and beta 1 cost 0.4 with epochs searched, and 0.5
# once epochs were held at their top (beta 0.5 or mix 0.125 no better; `first` alone costs 0.25).
BETA = 1.0  # πBO's beta: prior^(beta/n); at n = beta the prior counts as much as TPE's choice among its proposals
MIX = 0.25  # share of start-up trials drawn from the priors (PriorBand's prior/uniform mix)
CANDIDATES = 8  # TPE proposals per value re-weighted by the prior


def spread(confidence: float) -> float:
    """Standard deviation of a numeric prior as a share of its range: 0.25 at medium confidence (0.5)."""
    return max(0.5 * (1.0 - confidence), 0.02)


def _unit(d: Dist, x: float) -> float:
    """`x`'s place in the range of `d`, 0 at the low end and 1 at the high end (in logs for loguniform)."""
    lo, hi = float(d.args[0]), float(d.args[1])
    if d.kind == "loguniform":
        return (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (float(x) - lo) / (hi - lo)


def _from_unit(d: Dist, u: float):
    lo, hi = float(d.args[0]), float(d.args[1])
    if d.kind == "loguniform":
        return float(min(max(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))), lo), hi))
    if d.kind == "randint":
        return int(min(max(round(lo + u * (hi - lo)), lo), hi))
    return float(min(max(lo + u * (hi - lo), lo), hi))


def density(d: Dist, x) -> float:
    """The prior of `d` at `x`, up to a constant (1 where `d` has no prior)."""
    if d.prior is None:
        return 1.0
    if d.kind == "choice":
        k = len(d.args)
        top = 1.0 / k + d.confidence * (1.0 - 1.0 / k)
        return top if str(x) == str(d.prior) else (1.0 - top) / max(k - 1, 1)
    z = (_unit(d, x) - _unit(d, d.prior)) / spread(d.confidence)
    return math.exp(-0.5 * z * z)


def draw(d: Dist, rng: np.random.Generator):
    """One value from the prior of `d` (uniform over the range or the choices where it has none)."""
    if d.kind == "choice":
        p = np.array([density(d, a) for a in d.args])
        return d.args[int(rng.choice(len(d.args), p=p / p.sum()))]
    if d.prior is None:
        return _from_unit(d, float(rng.uniform()))
    centre, sd = _unit(d, d.prior), spread(d.confidence)
    for _ in range(100):  # the normal cut at the range's ends
        u = rng.normal(centre, sd)
        if 0.0 <= u <= 1.0:
            return _from_unit(d, u)
    return d.prior


def pick(space: dict[str, Dist]) -> dict:
    """The experts' pick: every key of `space` that has a prior, at it."""
    return {k: d.prior for k, d in space.items() if d.prior is not None}


class PriorSampler(BaseSampler):
    """`base` (TPE after random start-up trials) steered by the priors of `space`: the pick first, start-up
    trials from the priors at rate `mix`, then at rate mix * startup / n, the others TPE's proposals weighted by
    prior^(beta/n) (module docstring). Works with TPE's joint (multivariate, Optuna's default) proposals and
    its independent ones alike."""

    def __init__(self, base: BaseSampler, space: dict[str, Dist], *, seed: int, startup_trials: int,
                 beta: float = BETA, mix: float = MIX, candidates: int = CANDIDATES, first: bool = True):
        self.base, self.startup = base, startup_trials
        self.priors = {k: d for k, d in space.items() if d.prior is not None}
        self.beta, self.mix, self.candidates, self.first = beta, mix, candidates, first
        self.rng = np.random.default_rng(seed)
        self.uniform = RandomSampler(seed=seed)  # the values a prior trial has no prior for
        self._from_prior: dict[int, bool] = {}  # trial number -> all its values drawn from the priors

    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.uniform.reseed_rng()
        self.rng = np.random.default_rng()

    def _finished(self, study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def _prior_trial(self, study, trial) -> bool:
        """Whether `trial` draws all its values from the priors (decided once per trial)."""
        if trial.number not in self._from_prior:
            if self.first and trial.number == 0:
                self._from_prior[0] = True
            else:  # TPE's own start-up rule counts the trials finished so far
                rate = self.mix * min(1.0, self.startup / max(self._finished(study), 1))
                self._from_prior[trial.number] = bool(self.rng.uniform() < rate)
        return self._from_prior[trial.number]

    def _weighted(self, proposals: list[dict], n: int) -> dict:
        """One of TPE's `proposals`, drawn with probability prior^(beta/n)."""
        w = np.array([math.prod(density(self.priors[k], v) for k, v in x.items() if k in self.priors)
                      for x in proposals]) ** (self.beta / max(n, 1))
        w = w + 1e-300  # a proposal far out in a sharp prior keeps a (vanishing) chance
        return proposals[int(self.rng.choice(len(proposals), p=w / w.sum()))]

    def sample_relative(self, study, trial, search_space):
        if not self.priors or not search_space:
            return self.base.sample_relative(study, trial, search_space)
        if self._prior_trial(study, trial):
            return {}  # every value through sample_independent, from the priors
        n = self._finished(study)
        if n < self.startup or self.beta == 0:
            return self.base.sample_relative(study, trial, search_space)
        proposals = [self.base.sample_relative(study, trial, search_space) for _ in range(self.candidates)]
        return self._weighted(proposals, n) if proposals[0] else {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        d = self.priors.get(param_name)
        if self.priors and self._prior_trial(study, trial):
            if d is None:
                return self.uniform.sample_independent(study, trial, param_name, param_distribution)
            return d.prior if self.first and trial.number == 0 else draw(d, self.rng)
        n = self._finished(study)
        if d is None or n < self.startup or self.beta == 0:
            return self.base.sample_independent(study, trial, param_name, param_distribution)
        xs = [self.base.sample_independent(study, trial, param_name, param_distribution)
              for _ in range(self.candidates)]
        return self._weighted([{param_name: x} for x in xs], n)[param_name]


def prior_sampler(mode: str, base: BaseSampler, space: dict[str, Dist], *, seed: int, startup_trials: int,
                  **kw) -> BaseSampler:
    """`base` as `search.priors` says: unchanged for 'off' or a space without priors, else a `PriorSampler`:
    'first' tries the experts' pick first and nothing more, 'pibo' steers by the priors throughout."""
    if mode == "off" or not any(d.prior is not None for d in space.values()):
        return base
    if mode == "first":
        return PriorSampler(base, space, seed=seed, startup_trials=startup_trials, **{"mix": 0.0, "beta": 0.0, **kw})
    if mode == "pibo":
        return PriorSampler(base, space, seed=seed, startup_trials=startup_trials, **kw)
    raise ValueError(f"unknown priors mode {mode!r}")

