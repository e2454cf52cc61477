"""How sure an answer is: the confirmed gain's 95% interval and verdict, the seeds that would resolve it,
and the selection noise of the trials' holdout accuracies. Plain numpy; the one sentence of each that
the summary, best.yaml and the report all show.

The gain is the winner's mean val/ accuracy over its seeds minus the baseline's over the same seeds.
The seeds are not paired (a seed does not make two configs' runs alike), so the interval is Welch's:
gain +- t(0.975, df) x sqrt(s_w^2/n_w + s_b^2/n_b), with the Welch-Satterthwaite df. The t quantile is
computed here (the incomplete beta function, then bisection) so that scipy is not needed. The seeds
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

Z975, Z80 = 1.959964, 0.841621
POWER_FACTOR = 2 * (Z975 + Z80) ** 2  # seeds per side = POWER_FACTOR x variance / gain^2


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Numerical Recipes)."""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * f


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with `df` (possibly fractional) degrees of freedom."""
    if not math.isfinite(df) or df > 1e7:
        return Z975
    lo, hi = 0.0, 1e4
    for _ in range(200):  # bisection on the upper tail, 0.5 I_{df/(df+t^2)}(df/2, 1/2) = 0.025
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * _betainc(df / 2, 0.5, df / (df + mid * mid)) > 0.025 else (lo, mid)
    return (lo + hi) / 2


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
    se2 = vw / nw + vb / nb
    if se2 > 0:
        df = se2 ** 2 / ((vw / nw) ** 2 / (nw - 1) + (vb / nb) ** 2 / (nb - 1))
    else:  # identical runs on both sides: no spread to weigh
        df = nw + nb - 2
    half = 100 * t975(df) * math.sqrt(se2)
    out.update(low=out["points"] - half, high=out["points"] + half, df=float(df))
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
