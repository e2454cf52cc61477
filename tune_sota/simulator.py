"""Replays searches on recorded learning curves with a simulated clock, driving the product's own decision
code, so that a question like "what does ASHA's 50% rung cost?" is answered over hundreds of searches in
minutes instead of one search in twenty (issue 16; the curves come from bench/record_curves.py).

As in Syne Tune's simulator backend, nothing is re-implemented for the simulation: the searchers are
`searcher.StudySearcher` (Optuna's TPE or random sampler, or its GPSampler put on the same study) and
Ray's own `OptunaSearch`, driven through Ray's `Searcher` methods (`suggest`, `on_trial_result`,
`on_trial_complete`) in the order Tune calls them; the schedulers are `scheduler.ScheduleASHA` (its
`decide`) and Ray's stock `ASHAScheduler` (its public `on_trial_add` / `on_trial_result`, which read
only `trial.trial_id` and the result's `epoch` and `accuracy`). What is simulated is the training: a
trial's epochs come from the surrogate below, each taking its modelled seconds; W workers each run one
trial, and an event queue ordered by simulated time hands each finished epoch to the scheduler.

The surrogate (YAHPO Gym's approach: a model fitted on the table stands in for training, so a searcher
may propose values the table never recorded) is two random forests on the config's values:

- the holdout accuracy at each epoch, with the share of the schedule done (`epoch/epochs`) and the
  training size of that epoch relative to the final one as inputs: one model of the whole curve,
  for any length, in the coordinates ScheduleASHA judges in (a progressive-resizing stage is an input,
  so a 16 px stage can look worse than the 32 px stage that follows it, as it does in the records);
- the seconds of each epoch (CPU seconds of the trial's process where recorded: wall seconds on a
  shared machine measure the neighbours too).

The val/ accuracy of the final model (the truth a chosen config is scored by) is the curve's last point
plus the table's mean difference of val/ and final holdout accuracy: on the recorded trials the two
correlate at 0.99 (60 trials; differences of 1.2 points sd, about the holdout's own sampling noise). A
separate forest for val/ would add its own fitting errors to that difference, and a search would be
scored by a model that disagrees with the one it observed; with one model, the seed replicates' noise is
all that separates what a search sees from the truth, as in a real search.

Why random forests: the space mixes log-scaled, linear and categorical values with strong interactions
(a high learning rate needs long schedules; MixUp pays off only with epochs), which trees take without
scaling or encoding choices; a forest fits the few hundred recorded trials in a second; and, unlike a
GP or a network, a forest never predicts beyond the range of what it was fitted on, so a searcher cannot
win the simulation by finding an optimum that exists only in the surrogate's extrapolation (the trap
Eggensperger et al. 2015 and YAHPO warn of). Its price is a piecewise-constant response: two close
configs may get the same prediction, which blunts fine local search; the held-out rank correlation
(`heldout_spearman`) says how much that matters for the final accuracy.

Noise is not left to the forest (which averages it away) but drawn from the seed replicates: two runs
of one config differ by a seed offset that moves the whole holdout curve (the whole of the difference at
the last epoch), plus a jitter of the epochs before it, larger early in the schedule (measured by thirds:
on 10 pairs 3.5, 2.3 and 1.5 points); their standard deviations come from the replicate pairs
(`Surrogate.noise`). A search sees the noisy curve;
its choice is scored by the noise-free predicted val/ accuracy, and the regret is that against the best
predicted val/ accuracy over the recorded configs and a large random sample of the space.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd

from tune_sota.config import Config, Dist, SearchSettings, Space, hold_epochs
from tune_sota.schedule import parse_schedule, rung_shares, size_at_epoch

log = logging.getLogger(__name__)
METRIC, MODE = "accuracy", "max"
# A simulated search's sampler seed is this plus its seed: bench/record_curves.py recorded chunk N with Optuna's
# random sampler at seed N, and a simulated search at the same seed would propose exactly the recorded
# configs, on which the surrogate was fitted (its predictions there are in-sample, hence optimistic).
SEARCHER_SEEDS = 1_000_000
DEFAULT_NOISE = {"seed": 0.01, "epoch": 0.005, "val": 0.01}  # when a table has too few replicates to measure it


# ---------------------------------------------------------------- configs as features


def sample_config(space: Space, rng: np.random.Generator) -> dict:
    """One config of the space's searched values, drawn uniformly (log-uniformly for loguniform)."""
    out = {}
    for key, d in space.searched.items():
        lo_hi = d.args
        if d.kind == "choice":
            out[key] = d.args[int(rng.integers(len(d.args)))]
        elif d.kind == "randint":
            out[key] = int(rng.integers(int(lo_hi[0]), int(lo_hi[1]) + 1))
        elif d.kind == "loguniform":
            out[key] = float(math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1]))))
        else:
            out[key] = float(rng.uniform(*lo_hi))
    return out


class Encoder:
    """Searched values as numbers: log for loguniform, the value for numbers, one-hot for other choices."""

    def __init__(self, space: Space):
        self.space = space
        self.keys = list(space.searched)

    def value(self, params: dict, key: str):
        """A config value: the searched one, else the space's fixed one, else the schema default."""
        if key in params:
            return params[key]
        v = self.space.values.get(key, getattr(Config, key))
        return v.args[0] if isinstance(v, Dist) else v

    def row(self, params: dict) -> list[float]:
        out = []
        for key in self.keys:
            d: Dist = self.space.searched[key]
            v = params[key]
            numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in d.args)
            if d.kind == "choice" and not numeric:
                out += [float(str(v) == str(a)) for a in d.args]
            elif d.kind == "loguniform":
                out.append(math.log(float(v)))
            else:
                out.append(float(v))
        return out

    def epochs(self, params: dict) -> int:
        return int(self.value(params, "epochs"))

    def stage_sizes(self, params: dict) -> list[float]:
        """Each epoch's training size over the final size (progressive resizing)."""
        size, resize, n = int(self.value(params, "size")), str(self.value(params, "resize") or ""), self.epochs(params)
        stages = parse_schedule(resize) if resize else [(size, 1.0)]
        return [size_at_epoch(stages, n, e) / size for e in range(n)]

    def epoch_rows(self, params: dict) -> list[list[float]]:
        base, n = self.row(params), self.epochs(params)
        return [base + [(e + 1) / n, s] for e, s in enumerate(self.stage_sizes(params))]


# ---------------------------------------------------------------- the recorded table

# What the surrogate reads of a table (besides the space's searched values), as bench/record_curves.py
# writes it: the trial, the seed replicate it repeats, how it ended and its val/ accuracy, then per epoch
# its holdout accuracy and seconds.
TABLE_COLUMNS = ("trial_id", "replicate_of", "status", "val_accuracy", "epoch", "accuracy", "epoch_s", "cpu_s")
TABLE_DTYPES = {"trial_id": str, "replicate_of": str, "resize": str}  # ids and schedules as text, never numbers


def load_table(path, space_file=None) -> tuple[Space, pd.DataFrame]:
    """(space, table) of a recorded table (bench/record_curves.py's `curves.csv.gz`), its space read from
    `space_file` or the `space.yaml` beside it; a table that lacks what the surrogate reads is refused, naming
    the missing columns."""
    from pathlib import Path

    from tune_sota.config import UserError, load_space

    path = Path(path)
    space = load_space(str(space_file or path.parent / "space.yaml"))
    table = pd.read_csv(path, dtype=TABLE_DTYPES)
    missing = [c for c in (*TABLE_COLUMNS, *space.searched) if c not in table.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; a table of bench/record_curves.py has "
                        f"{', '.join(TABLE_COLUMNS)} and the space's searched keys")
    return space, table


# ---------------------------------------------------------------- the surrogate


def _trials(table: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: its config, status, final holdout accuracy and val/ accuracy."""
    last = table.sort_values("epoch").groupby("trial_id", sort=False).tail(1).set_index("trial_id")
    return last


def _forest(seed: int, trees: int):
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=trees, min_samples_leaf=2, max_features=0.6, random_state=seed,
                                 n_jobs=1)


class Forest:
    """A fitted random forest's trees as padded arrays, walked for all trees at once: scikit-learn's own
    `predict` costs about a millisecond per tree in call overhead, which for a few rows at a time (one
    proposal) dominated the whole simulation. Same predictions (the mean of the trees' leaf values)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int, trees: int):
        fitted = _forest(seed, trees).fit(X, y)
        ts = [e.tree_ for e in fitted.estimators_]
        width = max(t.node_count for t in ts)
        self.left, self.right = np.full((len(ts), width), -1), np.full((len(ts), width), -1)
        self.feature, self.threshold = np.zeros((len(ts), width), dtype=int), np.zeros((len(ts), width))
        self.value = np.zeros((len(ts), width))
        for i, t in enumerate(ts):
            n = t.node_count
            self.left[i, :n], self.right[i, :n] = t.children_left, t.children_right
            self.feature[i, :n], self.threshold[i, :n] = np.maximum(t.feature, 0), t.threshold
            self.value[i, :n] = t.value[:, 0, 0]
        self.depth = max(e.get_depth() for e in fitted.estimators_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=float))
        trees = np.arange(len(self.left))[:, None]
        node = np.zeros((len(self.left), len(X)), dtype=int)
        rows = np.arange(len(X))[None, :]
        for _ in range(self.depth):
            go_left = X[rows, self.feature[trees, node]] <= self.threshold[trees, node]
            child = np.where(go_left, self.left[trees, node], self.right[trees, node])
            node = np.where(child >= 0, child, node)  # a leaf stays where it is
        return self.value[trees, node].mean(axis=0)


@dataclass
class Draw:
    """One simulated training run: the holdout curve a search sees, its epochs' seconds, the truth."""

    params: dict
    curve: np.ndarray  # holdout accuracy after each epoch, noise included
    seconds: np.ndarray
    value: float  # noise-free predicted val/ accuracy of the final model
    at_final_size: np.ndarray  # whether each epoch trains at the final size (progressive resizing)


class Surrogate:
    """Learning curves, epoch seconds and val/ accuracy for any config of the space (see the module's
    docstring for the model and why)."""

    def __init__(self, table: pd.DataFrame, space: Space, *, seed: int = 0, trees: int = 60, candidates: int = 3000):
        self.space, self.enc = space, Encoder(space)
        table = table[table.status.isin(["completed", "diverged"])].copy()
        keys = self.enc.keys
        trials = _trials(table)
        floor = float(trials.val_accuracy.min()) if trials.val_accuracy.notna().any() else 0.0
        trials = trials.assign(val_accuracy=trials.val_accuracy.fillna(floor))  # a diverged trial is the worst
        self.configs = [{k: _plain(r[k]) for k in keys} for _, r in trials.iterrows()]
        xs, acc, sec = [], [], []
        secs = table.cpu_s.where(table.cpu_s.notna() & (table.cpu_s > 0), table.epoch_s) if "cpu_s" in table \
            else table.epoch_s
        table = table.assign(secs_=secs)
        for _tid, rows in table.groupby("trial_id", sort=False):
            params = {k: _plain(rows[k].iloc[0]) for k in keys}
            er = self.enc.epoch_rows(params)
            for r in rows.itertuples():
                if 1 <= r.epoch <= len(er):
                    xs.append(er[int(r.epoch) - 1])
                    acc.append(r.accuracy)
                    sec.append(r.secs_)
        self.curve_model = Forest(np.array(xs), np.array(acc), seed, trees)
        self.seconds_model = Forest(np.array(xs), np.array(sec), seed + 1, trees)
        ok = trials[trials.status == "completed"]
        self.offset = float((ok.val_accuracy - ok.accuracy).mean()) if len(ok) else 0.0  # val/ over final holdout
        self.noise = replicate_noise(table)
        self._cache: dict[tuple, tuple] = {}
        rng = np.random.default_rng(seed + 12345)
        self.candidates = self.configs + [sample_config(space, rng) for _ in range(candidates)]
        values = self.values(self.candidates)
        self.ranked = [self.candidates[i] for i in np.argsort(-values, kind="stable")]
        self.best = float(values.max())
        # the mean trial-seconds of one random proposal run to its end: the unit of searches compared at equal
        # compute (a random FIFO search of n trials spends about n of them)
        sampled = self.candidates[len(self.configs):] or self.configs
        rows = np.array([r for c in sampled for r in self.enc.epoch_rows(c)])
        self.trial_seconds = float(np.maximum(self.seconds_model.predict(rows), 1e-3).sum() / len(sampled))

    def values(self, configs: list[dict]) -> np.ndarray:
        """Noise-free val/ accuracy of each config: its curve's last point plus the val/ offset."""
        if not configs:
            return np.zeros(0)
        return self.curve_model.predict(np.array([self.enc.epoch_rows(c)[-1] for c in configs])) + self.offset

    def mean(self, params: dict) -> tuple[np.ndarray, np.ndarray, float]:
        """(noise-free holdout curve, seconds per epoch, val/ accuracy) of a config."""
        key = tuple(sorted((k, repr(v)) for k, v in params.items() if k in self.enc.keys))
        if key not in self._cache:
            er = np.array(self.enc.epoch_rows(params))
            curve = self.curve_model.predict(er)
            self._cache[key] = (curve, np.maximum(self.seconds_model.predict(er), 1e-3),
                                float(curve[-1] + self.offset))
        return self._cache[key]

    def draw(self, params: dict, rng: np.random.Generator) -> Draw:
        """A training run of `params` with one seed: the mean curve moved by a seed offset, plus jitter."""
        curve, seconds, value = self.mean(params)
        n = len(curve)
        jitter = rng.normal(0, 1, n) * [self.epoch_sd((e + 1) / n) for e in range(n)]
        noisy = curve + rng.normal(0, self.noise["seed"]) + jitter
        return Draw(params, np.clip(noisy, 0.0, 1.0), seconds, value,
                    np.array(self.enc.stage_sizes(params)) >= 1.0 - 1e-9)

    def epoch_sd(self, share: float) -> float:
        """The jitter of one epoch's holdout accuracy around the seed's offset, at `share` of its schedule:
        none at the end (the seed offset is the final epoch's whole noise, as measured), more early on, by
        thirds of the schedule as the replicate pairs measured it."""
        if share >= 1 - 1e-9:
            return 0.0
        thirds = self.noise.get("epoch_thirds") or [self.noise["epoch"]] * 3
        return float(thirds[min(2, int(share * 3 - 1e-9))])

    def run_seconds(self, params: dict) -> float:
        """Modelled trial-seconds of one whole run of `params`."""
        return float(np.sum(self.mean(params)[1]))

    def baseline(self) -> dict:
        """Chapter 7's plain recipe (config.BASELINE) in the space's searched keys, each clipped to what the
        surrogate can answer: a choice the space lacks becomes its first choice, a number its range."""
        from tune_sota.config import BASELINE

        out = {}
        for key, d in self.space.searched.items():
            v = BASELINE.get(key, getattr(Config, key))
            if key == "resize" and not v:
                v = str(self.enc.value({}, "size"))  # no progressive resizing: the final size throughout
            if d.kind == "choice":
                out[key] = next((a for a in d.args if str(a) == str(v)), d.args[0])
            else:
                lo, hi = float(d.args[0]), float(d.args[1])
                out[key] = type(d.args[0])(min(max(float(v), lo), hi)) if d.kind == "randint" else \
                    min(max(float(v), lo), hi)
        return out


def _plain(v):
    """A table cell as the value a searcher proposes (numpy scalars to Python ones)."""
    return v.item() if hasattr(v, "item") else v


def replicate_noise(table: pd.DataFrame) -> dict[str, float]:
    """Standard deviations of one run's seed offset, per-epoch jitter and val/ accuracy, from the pairs of
    a trial and its seed replicate (`replicate_of`); defaults when fewer than 3 pairs are recorded."""
    if "replicate_of" not in table:
        return {**DEFAULT_NOISE, "pairs": 0}
    reps = table[table.replicate_of.fillna("").astype(str) != ""]
    d_final, d_jitter, d_val, thirds = [], [], [], ([], [], [])
    for _rid, rep in reps.groupby("trial_id"):
        orig = table[table.trial_id == rep.replicate_of.iloc[0]]
        a, b = rep.set_index("epoch").accuracy, orig.set_index("epoch").accuracy
        common = a.index.intersection(b.index)
        if len(common) == 0 or len(a) != len(b):  # a diverged run is no seed pair
            continue
        d = (a[common] - b[common]).to_numpy()
        d_final.append(d[-1])
        d_jitter += list(d[:-1] - d[-1])
        for e, x in enumerate(d[:-1] - d[-1]):
            thirds[min(2, int((e + 1) / len(d) * 3 - 1e-9))].append(x)
        d_val.append(float(rep.val_accuracy.iloc[0]) - float(orig.val_accuracy.iloc[0]))
    if len(d_final) < 3:
        log.warning("only %d seed replicate pairs: noise set to defaults %s", len(d_final), DEFAULT_NOISE)
        return {**DEFAULT_NOISE, "pairs": len(d_final)}
    sqrt2 = math.sqrt(2)  # a difference of two runs has twice one run's variance
    epoch = float(np.std(d_jitter, ddof=1) / sqrt2) if len(d_jitter) > 1 else DEFAULT_NOISE["epoch"]
    return {"seed": float(np.std(d_final, ddof=1) / sqrt2), "epoch": epoch,
            # by thirds of the schedule (early epochs differ more between seeds); the overall figure where a
            # third has fewer than 5 differences
            "epoch_thirds": [float(np.std(t, ddof=1) / sqrt2) if len(t) >= 5 else epoch for t in thirds],
            "val": float(np.nanstd(d_val, ddof=1) / sqrt2), "pairs": len(d_final)}


def heldout_spearman(table: pd.DataFrame, space: Space, *, folds: int = 5, seed: int = 0) -> tuple[float, int]:
    """Spearman correlation of predicted and recorded val/ accuracy on configs held out of the fit
    (k-fold over configs; a replicate stays with its original); returns (rho, configs scored)."""
    from scipy.stats import spearmanr

    table = table[table.status == "completed"]
    group = table.replicate_of.fillna("").astype(str).where(lambda s: s != "", table.trial_id) \
        if "replicate_of" in table else table.trial_id
    table = table.assign(_group=group)
    groups = np.array(sorted(table._group.unique()))
    np.random.default_rng(seed).shuffle(groups)
    pred, real = [], []
    for k in range(folds):
        test = set(groups[k::folds])
        fit = Surrogate(table[~table._group.isin(test)], space, seed=seed, candidates=0)
        held = _trials(table[table._group.isin(test)])
        for _g, rows in held.groupby("_group"):
            pred.append(fit.mean({key: _plain(rows[key].iloc[0]) for key in fit.enc.keys})[2])
            real.append(float(rows.val_accuracy.mean()))
    return float(spearmanr(pred, real).statistic), len(real)


# ---------------------------------------------------------------- methods: the product's own code


SHIPPED = SearchSettings()  # the product's defaults: what "tune_sota" replays


@dataclass(frozen=True)
class Method:
    """A search method: a searcher and a scheduler, as `search:` would name them (unset: the shipped ones)."""

    searcher: str  # random | tpe | gp | ray-optuna | oracle
    scheduler: str  # fifo | asha | ray-asha | rungs (ScheduleASHA at exactly `shares`)
    grace: float = SHIPPED.grace
    rf: int = SHIPPED.reduction_factor
    startup: int = SHIPPED.startup_trials
    shares: tuple = ()
    final_size: bool = SHIPPED.final_size_rungs  # progressive-resizing trials judged only at their final size
    priors: str = SHIPPED.priors  # search.priors: off, first or pibo (priors.PriorSampler) on the space's priors
    prior_options: tuple = ()  # (name, value) pairs for PriorSampler: beta, mix, candidates
    wrong: bool = False  # the priors replaced by the worst corner of the space (worst_corner)
    right: bool = False  # the priors replaced by the surrogate's best config: what a prior could win at most
    epochs: str = SHIPPED.epochs  # search.epochs: max holds a searched range at its top (config.hold_epochs)

    def label(self) -> str:
        """The method in `search:` terms."""
        if self.scheduler == "fifo":
            sched = "fifo"
        elif self.scheduler == "ray-asha":
            sched = f"ray-asha grace {self.grace:g} rf {self.rf}"
        else:
            shares = self.shares or tuple(rung_shares(self.grace, self.rf))
            sched = f"asha rungs {'/'.join(f'{x:.0%}' for x in shares)} rf {self.rf}" + \
                (" final size" if self.final_size else "")
        searcher = f"{self.searcher} ({self.startup} start-up)" if self.searcher in ("tpe", "gp", "ray-optuna") \
            else self.searcher
        if self.priors != "off":
            opts = ", ".join(f"{k} {v:g}" for k, v in self.prior_options)
            searcher += f", priors {self.priors}{f' ({opts})' if opts else ''}" + (" WRONG: the worst corner" if
                                                                                  self.wrong else "") + \
                (" RIGHT: the best config" if self.right else "")
        return f"{sched} / {searcher}" + (", epochs at the top" if self.epochs == "max" else "")


def _prior(mode: str, **kw) -> Method:
    """The shipped method with `search.priors: mode`."""
    return Method(SHIPPED.searcher, SHIPPED.scheduler, priors=mode, **kw)


# The anchors search the whole space, epochs included, as their stock versions would.
METHODS = {
    "random": Method("random", "fifo", epochs="searched"),
    "tune_sota": Method(SHIPPED.searcher, SHIPPED.scheduler),  # the shipped defaults (SearchSettings)
    "tune_sota-searched": Method(SHIPPED.searcher, SHIPPED.scheduler, epochs="searched"),  # before issue 26
    "tpe": Method("tpe", "fifo", epochs="searched"),
    "random+asha": Method("random", "asha", epochs="searched"),
    "tpe+ray-asha": Method("tpe", "ray-asha", epochs="searched"),
    # TPE told ASHA's stops as complete (Ray's OptunaSearch)
    "ray-optuna+asha": Method("ray-optuna", "asha", epochs="searched"),
    "gp+asha": Method("gp", "asha", epochs="searched"),
    "oracle": Method("oracle", "fifo", epochs="searched"),
    # issue 26: the space's priors (priors.py) as declared, with the worst corner of the space declared instead
    # (-wrong), and with the surrogate's best config declared (-right: what a prior could win at most)
    "priors": _prior("pibo"),
    "priors-wrong": _prior("pibo", wrong=True),
    "priors-right": _prior("pibo", right=True),
    "priors-first": _prior("first"),  # only the experts' pick, as the first trial
    "priors-first-wrong": _prior("first", wrong=True),
    "priors-first-right": _prior("first", right=True),
    "priors-mix0.5-beta2": _prior("pibo", prior_options=(("mix", 0.5), ("beta", 2.0))),
    "priors-mix0.5-beta2-wrong": _prior("pibo", prior_options=(("mix", 0.5), ("beta", 2.0)), wrong=True),
    "priors-beta0": _prior("pibo", prior_options=(("mix", 0.5), ("beta", 0.0))),
    "priors-beta0-wrong": _prior("pibo", prior_options=(("mix", 0.5), ("beta", 0.0)), wrong=True),
}


def worst_corner(model: Surrogate, held: dict | None = None, limit: int = 20000) -> dict:
    """The corner of the space the surrogate rates worst: each number at an end of its range, each choice
    any of its options (a random `limit` of the corners where there are more): the deliberately wrong
    prior. `held`: values the search holds (search.epochs: max), the corner taken among the rest. Kept on the
    model, so that bench/simulate.py computes it once before its workers fork."""
    held = held or {}
    cache = model.__dict__.setdefault("worst_corners", {})
    if (key := tuple(sorted(held.items()))) in cache:
        return cache[key]
    dists = {k: d for k, d in model.space.searched.items() if k not in held}
    options = [[d.args[0], d.args[1]] if d.kind != "choice" else list(d.args) for d in dists.values()]
    keys = list(dists)
    if math.prod(len(o) for o in options) <= limit:
        corners = [{**dict(zip(keys, c)), **held} for c in itertools.product(*options)]
    else:
        rng = np.random.default_rng(0)
        corners = [{**{k: o[int(rng.integers(len(o)))] for k, o in zip(keys, options)}, **held} for _ in range(limit)]
    cache[key] = corners[int(np.argmin(model.values(corners)))]
    return cache[key]


def method_space(model: Surrogate, method: Method) -> tuple[Space, dict]:
    """(the space `method` searches, the values it holds of the table's searched keys): `search.epochs` applied
    as search.run applies it (max holds epochs at the top of its range)."""
    space = dataclasses.replace(model.space, search=dataclasses.replace(model.space.search, epochs=method.epochs))
    space, top = hold_epochs(space)
    return space, ({"epochs": top} if top else {})


def with_priors(space: Space, picks: dict) -> dict[str, Dist]:
    """The space's distributions with `picks` as their priors (at each key's own confidence, medium where
    it declared none)."""
    import dataclasses

    return {k: dataclasses.replace(d, prior=picks[k]) if k in picks else d for k, d in space.searched.items()}


class OracleSearcher:
    """Proposes the surrogate's best config every time: the zero-regret yardstick (and a test's check that
    the simulator can tell a perfect searcher from a blind one)."""

    def __init__(self, best: dict):
        self.best = best

    def suggest(self, trial_id: str) -> dict:
        return dict(self.best)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def make_searcher(method: Method, space: Space, seed: int, model: Surrogate):
    """The searcher object a real search would build for `method` (its study in memory)."""
    import optuna

    from tune_sota import searcher

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if method.searcher == "oracle":
        return OracleSearcher(model.ranked[0])
    if method.searcher == "ray-optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space={k: searcher.distribution(d) for k, d in space.searched.items()}, metric=METRIC,
                            mode=MODE, sampler=searcher.sampler("tpe", seed, method.startup))
    s = searcher.StudySearcher(space.searched, storage=optuna.storages.InMemoryStorage(), study_name="sim",
                               metric=METRIC, mode=MODE, kind=method.searcher if method.searcher in ("random", "gp")
                               else "tpe", seed=seed, startup_trials=method.startup, priors=method.priors)
    if method.wrong or method.right:  # the worst corner (or the best config) declared as the experts' pick, for
        # the keys the space gives priors
        pick = worst_corner(model, method_space(model, method)[1]) if method.wrong else model.ranked[0]
        keys = [k for k, d in space.searched.items() if d.prior is not None] or list(space.searched)
        s.space = with_priors(space, {k: pick[k] for k in keys})
    s.prior_options = dict(method.prior_options)
    return s


class Rule:
    """A scheduler behind one question, `stop(trial, epoch, epochs, value)`, as Tune would ask it."""

    def __init__(self, method: Method, max_epochs: int):
        from tune_sota.scheduler import ScheduleASHA, make_scheduler

        self.kind = method.scheduler
        if self.kind in ("asha", "rungs"):  # the product's make_scheduler builds this one, shares from grace, rf
            shares = list(method.shares) if self.kind == "rungs" else rung_shares(method.grace, method.rf)
            self.sched = ScheduleASHA(shares=shares, reduction_factor=method.rf, metric=METRIC, mode=MODE,
                                      final_size=method.final_size)
        else:
            self.sched = make_scheduler(self.kind, grace=method.grace, reduction_factor=method.rf,
                                        max_epochs=max_epochs)
            self.sched.set_search_properties(METRIC, MODE)
        self.trials: dict[str, SimpleNamespace] = {}

    def add(self, trial_id: str) -> None:
        self.trials[trial_id] = SimpleNamespace(trial_id=trial_id)  # all Ray's ASHA reads of a Trial
        if self.kind == "ray-asha":
            self.sched.on_trial_add(None, self.trials[trial_id])

    def stop(self, trial_id: str, result: dict) -> bool:
        if self.kind == "fifo":
            return False
        if self.kind in ("asha", "rungs"):
            return self.sched.decide(trial_id, result["epoch"], result["epochs"], result[METRIC],
                                     group=result["sched"], at_final_size=result["at_final_size"]) == "STOP"
        return self.sched.on_trial_result(None, self.trials[trial_id], result) == "STOP"

    def complete(self, trial_id: str, result: dict) -> None:
        if self.kind == "ray-asha":
            self.sched.on_trial_complete(None, self.trials[trial_id], result)


@dataclass
class Run:
    """One simulated search: an event per ended trial, and every trial's draw and fate."""

    events: np.ndarray  # columns: compute (trial-seconds), simulated wall seconds, regret of the choice, trials ended
    trials: list[dict] = field(default_factory=list)
    searcher: object = None  # the searcher it drove (its study holds what it was told)
    best: float = math.nan  # the best val/ accuracy in the space, which regret is measured against

    def first(self, budget: int) -> list[dict]:
        """The trials of a search of `budget` trials: the first `budget` proposed (the simulation may run on
        past them; later trials only add records to the rungs these were judged at)."""
        return [t for t in self.trials if t["n"] < budget]

    def choice(self, budget: int) -> dict | None:
        """What the product picks after `budget` trials: the completed trial with the best final holdout
        accuracy (None if every one was stopped)."""
        done = [t for t in self.first(budget) if not t["stopped"]]
        return max(done, key=lambda t: t["final"]) if done else None

    def regret_of(self, budget: int) -> float:
        c = self.choice(budget)
        return self.best - c["value"] if c else math.inf

    def compute_of(self, budget: int) -> float:
        """Trial-seconds the first `budget` trials spent."""
        return float(sum(t["seconds"] for t in self.first(budget)))

    def regret_after(self, n: int) -> float:
        """Regret of the choice once `n` trials have ended (the last event if fewer ended)."""
        e = self.events[self.events[:, 3] <= n]
        return float(e[-1, 2]) if len(e) else math.inf

    def compute_after(self, n: int) -> float:
        e = self.events[self.events[:, 3] <= n]
        return float(e[-1, 0]) if len(e) else math.nan

    def compute_to(self, regret: float) -> float:
        """Trial-seconds spent when the choice first came within `regret` (inf if never)."""
        hit = self.events[self.events[:, 2] <= regret + 1e-12]
        return float(hit[0, 0]) if len(hit) else math.inf

    def regret_at(self, compute: np.ndarray) -> np.ndarray:
        """Regret of the choice at each compute point (inf before the first completed trial)."""
        idx = np.searchsorted(self.events[:, 0], compute, side="right") - 1
        out = np.where(idx >= 0, self.events[np.maximum(idx, 0), 2], np.inf)
        return out


def simulate(model: Surrogate, method: Method, *, seed: int, workers: int, trials: int,
             compute: float = math.inf) -> Run:
    """Replay one search of `trials` trials on `workers` workers: an event queue in simulated time, each
    epoch costing its modelled seconds, the method's own scheduler and searcher deciding. With `compute`, no
    trial starts once the trials that ended or ran have spent that many trial-seconds (the trials running
    then finish): searches compared at equal compute rather than equal trials, so a method that spends less
    per trial runs more of them."""
    space, held = method_space(model, method)
    max_epochs = max(model.enc.epochs(c) for c in model.candidates) if model.candidates else 1
    searcher = make_searcher(method, space, SEARCHER_SEEDS + seed, model)
    rule = Rule(method, max_epochs)
    heap: list[tuple[float, int, str]] = []
    seq = itertools.count()
    live: dict[str, dict] = {}
    done: list[dict] = []
    events = []
    state = {"started": 0, "compute": 0.0, "best_obs": -math.inf, "choice": math.nan, "ended": 0}

    def start(now: float) -> None:
        if state["started"] >= trials or state["compute"] >= compute:
            return
        trial_id = f"t{state['started']:05d}"
        params = searcher.suggest(trial_id)
        if params is None:
            return
        params = {**params, **held}
        draw = model.draw(params, np.random.default_rng([seed, state["started"]]))
        live[trial_id] = {"id": trial_id, "draw": draw, "epoch": 0, "n": state["started"],
                          "sched": str(params.get("sched") or "one_cycle")}
        state["started"] += 1
        rule.add(trial_id)
        heapq.heappush(heap, (now + draw.seconds[0], next(seq), trial_id))

    for _ in range(workers):
        start(0.0)
    while heap:
        now, _, trial_id = heapq.heappop(heap)
        t = live[trial_id]
        d, e = t["draw"], t["epoch"] + 1
        t["epoch"] = e
        n = len(d.curve)
        state["compute"] += float(d.seconds[e - 1])
        result = {METRIC: float(d.curve[e - 1]), "epoch": e, "epochs": n, "training_iteration": e,
                  "sched": t["sched"],  # the schedule shape: tune_sota's ASHA compares each only with itself
                  "at_final_size": bool(d.at_final_size[e - 1])}
        stopped = e < n and rule.stop(trial_id, result)
        if e < n and not stopped:
            searcher.on_trial_result(trial_id, result)
            heapq.heappush(heap, (now + d.seconds[e], next(seq), trial_id))
            continue
        if not stopped:  # Tune hands a finished trial's last result to both, a stopped one's only to complete
            searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
        rule.complete(trial_id, result)
        state["ended"] += 1
        if not stopped and result[METRIC] > state["best_obs"]:  # the product picks the best completed trial
            state["best_obs"], state["choice"] = result[METRIC], d.value
        events.append((state["compute"], now, model.best - state["choice"] if not math.isnan(state["choice"])
                       else math.inf, state["ended"]))
        done.append({"id": trial_id, "n": t["n"], "value": d.value, "final": float(d.curve[-1]), "epochs": n,
                     "epochs_run": e, "stopped": stopped, "seconds": float(np.sum(d.seconds[:e])), **d.params})
        del live[trial_id]
        start(now)
    return Run(np.array(events, dtype=float).reshape(-1, 4), done, searcher, model.best)


def confirm(model: Surrogate, run: Run, budget: int, *, top: int, seeds: int, rng: np.random.Generator) -> dict:
    """The product's confirmation (confirm.py) replayed after a search of `budget` trials: the `top` best
    completed trials on the holdout are each retrained with `seeds` seeds and scored on val/ (each run's
    val/ accuracy is the config's plus a seed's noise, `noise["val"]`), the best mean wins; the baseline
    runs `seeds` times too, for the gain. `top` 0 is no confirmation: the holdout's pick stands.
    Returns the pick's regret, whether it is the best config the search ran (by true val/ accuracy), and
    the confirmation's cost in trial-seconds and as a share of the search's."""
    done = sorted((t for t in run.first(budget) if not t["stopped"]), key=lambda t: -t["final"])
    if not done:
        return {"regret": math.inf, "picked_best": False, "cost": 0.0, "share": 0.0}
    truly = max(done, key=lambda t: t["value"])
    pick, cost = done[0], 0.0
    if top and seeds:
        cands = done[:top]
        means = [t["value"] + float(np.mean(rng.normal(0, model.noise["val"], seeds))) for t in cands]
        pick = cands[int(np.argmax(means))]
        params = [{k: t[k] for k in model.enc.keys} for t in cands]
        cost = seeds * (sum(model.run_seconds(p) for p in params) + model.run_seconds(model.baseline()))
    return {"regret": model.best - pick["value"], "picked_best": pick is truly, "cost": cost,
            "share": cost / max(run.compute_of(budget), 1e-9)}


# ---------------------------------------------------------------- statistics


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle half (rliable's aggregate); inf if an inf is in it."""
    x = np.sort(np.asarray(x, dtype=float))
    k = len(x) // 4
    return float(np.mean(x[k:len(x) - k])) if len(x) else math.nan


def _boot_iqm(x: np.ndarray, rng: np.random.Generator, reps: int) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    n, k = len(x), len(x) // 4
    sample = np.sort(x[rng.integers(0, n, (reps, n))], axis=1)
    with np.errstate(invalid="ignore"):
        return sample[:, k:n - k].mean(axis=1)


def iqm_interval(x, *, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(IQM, low, high): the IQM over seeds with a bootstrap 95% interval."""
    boot = _boot_iqm(np.asarray(x, dtype=float), np.random.default_rng(seed), reps)
    return iqm(x), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def paired_interval(a, b, *, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a - b) with a bootstrap 95% interval, a[i] and b[i] from the same searcher seed. Seed i of two
    methods proposes the same configs while both sample at random (TPE's start-up is Optuna's random sampler
    with the same seed) and draws the same noise for its n-th trial, so the differences of the pairs vary
    less than two independent IQMs do: it is what decides between two settings."""
    d = np.asarray(a, float) - np.asarray(b, float)
    boot = d[np.random.default_rng(seed).integers(0, len(d), (reps, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def ratio_interval(a, b, *, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM(a) / IQM(b) with a bootstrap 95% interval, the two resampled independently (seeds of two
    methods are independent searches)."""
    rng = np.random.default_rng(seed)
    ba, bb = _boot_iqm(np.asarray(a, float), rng, reps), _boot_iqm(np.asarray(b, float), rng, reps)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = ba / bb
        point = iqm(a) / iqm(b)
    r = np.where(np.isnan(r), np.inf, r)
    return float(point), float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


# ---------------------------------------------------------------- a synthetic table (tests, dry runs)


def synthetic_space() -> Space:
    """A small space shaped like bench/curves/space.yaml (for the synthetic table)."""
    from tune_sota.config import parse_space

    return parse_space({"data": "digits", "size": 32, "lr": {"loguniform": [1e-3, 6e-2]},
                        "epochs": {"randint": [2, 8]}, "mixup": {"choice": [0.0, 0.2]},
                        "label_smoothing": {"uniform": [0.0, 0.2]}, "resize": {"choice": ["32", "16>32"]}},
                       name="synthetic")


def synthetic_table(n: int = 60, *, seed: int = 0, replicate_share: float = 0.3, space: Space | None = None
                    ) -> pd.DataFrame:
    """A table in bench/record_curves.py's format whose curves follow a made-up law with the biases seen
    in issue 16: a high learning rate ends best on long schedules but looks worst mid-schedule, a 16 px
    stage looks worse than the 32 px one after it, longer is better, and seeds add noise."""
    space = space or synthetic_space()
    enc, rng = Encoder(space), np.random.default_rng(seed)
    rows = []
    configs = [sample_config(space, rng) for _ in range(n)]
    reps = set(rng.choice(n, size=int(round(replicate_share * n)), replace=False).tolist())
    for i, params in enumerate(configs):
        for rep in ([0, 1] if i in reps else [0]):
            epochs = enc.epochs(params)
            lr = math.log10(float(params.get("lr", 3e-3)))
            best_lr = -2.3 + 0.08 * (epochs - 5)  # longer schedules take higher learning rates
            final = 0.62 + 0.012 * epochs - 0.25 * (lr - best_lr) ** 2 + 0.1 * params.get("label_smoothing", 0) \
                - 0.03 * params.get("mixup", 0) * max(0, 6 - epochs)
            offset = rng.normal(0, 0.01)
            for e, stage in enumerate(enc.stage_sizes(params), start=1):
                s = e / epochs
                acc = 0.1 + (final - 0.1) * s ** 0.5 - 0.6 * (10 ** lr) * 4 * s * (1 - s) - 0.05 * (stage < 1)
                rows.append({"chunk": "synthetic", "trial_id": f"c{i:04d}" + (f"-r{rep}" if rep else ""),
                             "replicate_of": f"c{i:04d}" if rep else "", "seed": 42 + 1000 * rep,
                             "status": "completed", "epochs": epochs,
                             "val_accuracy": final + offset + rng.normal(0, .005),
                             "val_tta": final + offset + 0.02, "score_s": 5.0, **params, "epoch": e,
                             "size": int(stage * 32), "accuracy": acc + offset + rng.normal(0, 0.005),
                             "train_loss": 2.0 - acc, "valid_loss": 2.0 - acc,
                             "epoch_s": 3 + 10 * stage ** 2, "cpu_s": 3 + 10 * stage ** 2})
    table = pd.DataFrame(rows)
    for _tid, rows_ in table.groupby("trial_id"):  # val/ accuracy is one value per trial
        table.loc[rows_.index, "val_accuracy"] = rows_.val_accuracy.iloc[0]
    return table
