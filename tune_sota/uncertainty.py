"""How sure an answer is: the confirmed gain's 95% interval and verdict, the seeds that would resolve it,
and the selection noise of the trials' holdout accuracies. numpy and scipy; the one sentence of each that
the summary, best.yaml and the report all show.

The gain is the winner's mean val/ accuracy over its seeds minus the baseline's over the same seeds.
The seeds are not paired (a seed does not make two configs' runs alike), so the interval is Welch's:
gain +- t(0.975, df) x sqrt(s_w^2/n_w + s_b^2/n_b), with the Welch-Satterthwaite df: scipy's Welch test
(`scipy.stats.ttest_ind(equal_var=False)`), imported when a gain is computed (it costs the CLI's start half a
second). The seeds
that would resolve a gain of this size are per side, for a two-sided 5% test at 80% power, from the
normal approximation n = 2 (z_0.975 + z_0.8)^2 s^2 / gain^2 with s^2 the mean of the two variances
(the t test needs a seed or two more when n is small).

Selection noise: a trial's holdout accuracy p on n images has a binomial standard error
sqrt(p (1 - p) / n) (947 images at 60% is 1.6 points). The completed trials' accuracies spread by
their real differences and that noise together; where the spread is not much above the noise, the
search's ranking, and its pick, is partly luck (the confirmation on val/ over seeds is what tells).
"""

from __future__ import annotations

import math

import numpy as np

Z975, Z80 = 1.959964, 0.841621  # the normal quantiles of a two-sided 5% test at 80% power
POWER_FACTOR = 2 * (Z975 + Z80) ** 2  # seeds per side = POWER_FACTOR x variance / gain^2


def gain(winner: list[float], baseline: list[float]) -> dict:
    """The gain in points (winner minus baseline accuracies, each a list over seeds), its 95% Welch
    interval, the verdict and the seeds per side that would resolve a gain of this size."""
    w, b = np.asarray(winner, float), np.asarray(baseline, float)
    nw, nb = len(w), len(b)
    out = {"points": 100 * float(w.mean() - b.mean()), "low": None, "high": None, "df": None,
           "seeds": [nw, nb], "seeds_to_resolve": None}
    if nw < 2 or nb < 2:
        out["verdict"] = f"no interval with {min(nw, nb)} seed on a side: a gain needs at least 2 seeds each"
        return out
    vw, vb = w.var(ddof=1), b.var(ddof=1)
    if vw / nw + vb / nb > 0:
        from scipy import stats

        welch = stats.ttest_ind(w, b, equal_var=False)
        ci = welch.confidence_interval(0.95)
        out.update(low=100 * float(ci.low), high=100 * float(ci.high), df=float(welch.df))
    else:  # identical runs on both sides: no spread to weigh, a zero-width interval (scipy's would be NaN)
        out.update(low=out["points"], high=out["points"], df=float(nw + nb - 2))
    seeds = f"{nw} seeds" if nw == nb else f"{nw} and {nb} seeds"
    if out["low"] > 0:
        out["verdict"] = "better than the recipe"
    elif out["high"] < 0:
        out["verdict"] = "worse than the recipe"
    else:
        out["verdict"] = f"not distinguishable from the recipe with {seeds}"
    var = (vw + vb) / 2
    if out["points"] != 0:
        out["seeds_to_resolve"] = max(2, math.ceil(POWER_FACTOR * var * 1e4 / out["points"] ** 2))
    return out


def gain_line(g: dict) -> str:
    """One sentence: `+0.7 points, 95% interval [-1.2, +2.6]: not distinguishable from it with 3 seeds; ...`."""
    text = f"{g['points']:+.1f} points"
    if g.get("low") is None:
        return f"{text}: {g['verdict']}"
    text += f", 95% interval [{g['low']:+.1f}, {g['high']:+.1f}] (Welch's t): {g['verdict']}"
    n = g.get("seeds_to_resolve")
    if n is None:
        return text + "; a gain of 0 is resolved by no number of seeds"
    return text + (f"; about {n} seeds per side would resolve a gain of this size (80% power, 5% two-sided)")


def selection_noise(trials) -> dict | None:
    """The binomial standard error of a completed trial's holdout accuracy against the spread (std) of
    the completed trials' accuracies, in points; None without 2 completed trials or a holdout size."""
    if trials is None or not len(trials) or "n_valid" not in trials or "status" not in trials:
        return None
    done = trials[trials.status == "completed"]
    n_valid = done.n_valid.dropna()
    if len(done) < 2 or n_valid.empty:
        return None
    n, p = int(n_valid.median()), float(done.accuracy.mean())
    se = 100 * math.sqrt(max(p * (1 - p), 0.0) / n)
    spread = 100 * float(done.accuracy.std(ddof=1))
    return {"n_valid": n, "trials": len(done), "mean_accuracy": p, "se_points": se, "spread_points": spread,
            "real_spread_points": math.sqrt(max(spread ** 2 - se ** 2, 0.0))}


def selection_line(s: dict, judged: str = "holdout") -> str:
    """One sentence comparing a trial's binomial noise with the trials' spread."""
    ratio = s["spread_points"] / s["se_points"] if s["se_points"] > 0 else math.inf
    if ratio >= 2:
        reading = "the trials differ by well more than the noise"
    elif ratio >= 1.2:
        reading = "the trials differ by little more than the noise: the top ranks are partly luck"
    else:
        reading = "the trials differ by no more than the noise: the pick is mostly luck until confirmed"
    return (f"selection noise: a {judged} accuracy of {100 * s['mean_accuracy']:.0f}% on {s['n_valid']} images has a "
            f"standard error of ±{s['se_points']:.1f} points; the {s['trials']} completed trials spread "
            f"±{s['spread_points']:.1f} (std): {reading}")
