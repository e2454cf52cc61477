"""The gain's interval, verdict and seeds, and the selection noise: against scipy where it is installed
(it is not a dependency) and against figures worked by hand."""

import math

import pandas as pd
import pytest

from tune_sota import uncertainty


@pytest.mark.parametrize("df", [1, 1.5, 2, 2.7, 3.8, 5, 9.3, 30, 200, 1e5])
def test_t_quantile_is_students(df):
    stats = pytest.importorskip("scipy.stats")
    assert uncertainty.t975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)


def test_welch_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    w, b = [0.62, 0.64, 0.63], [0.61, 0.625, 0.60, 0.59]
    g = uncertainty.gain(w, b)
    ci = stats.ttest_ind(w, b, equal_var=False).confidence_interval(0.95)
    assert (g["low"], g["high"]) == pytest.approx((100 * ci.low, 100 * ci.high), rel=1e-6)
    assert g["seeds"] == [3, 4] and g["verdict"] == "not distinguishable from the recipe with 3 and 4 seeds"


@pytest.mark.parametrize("winner,baseline,verdict", [
    ([0.70, 0.71, 0.72], [0.60, 0.61, 0.62], "better than the recipe"),
    ([0.60, 0.61, 0.62], [0.70, 0.71, 0.72], "worse than the recipe"),
    ([0.62, 0.66, 0.60], [0.61, 0.63, 0.62], "not distinguishable from the recipe with 3 seeds"),
    ([0.62, 0.66], [0.61, 0.63, 0.62], "not distinguishable from the recipe with 2 and 3 seeds"),
])
def test_verdict(winner, baseline, verdict):
    g = uncertainty.gain(winner, baseline)
    assert g["verdict"] == verdict and g["low"] <= g["points"] <= g["high"]
    assert verdict in uncertainty.gain_line(g)


def test_seeds_to_resolve_a_gain_is_the_power_calculation():
    # std 1 point on each side, gain 1 point: 2 x (1.96 + 0.84)^2 = 15.7 -> 16 seeds per side
    w, b = [0.61, 0.62, 0.63], [0.60, 0.61, 0.62]
    g = uncertainty.gain(w, b)
    assert g["points"] == pytest.approx(1.0) and g["seeds_to_resolve"] == 16
    assert "about 16 seeds per side would resolve a gain of this size" in uncertainty.gain_line(g)


def test_one_seed_or_no_gain_says_so():
    assert uncertainty.gain([0.6], [0.5, 0.55])["low"] is None
    assert "needs at least 2 seeds" in uncertainty.gain_line(uncertainty.gain([0.6], [0.5, 0.55]))
    same = uncertainty.gain([0.6, 0.6], [0.6, 0.6])
    assert same["seeds_to_resolve"] is None and "no number of seeds" in uncertainty.gain_line(same)


def test_selection_noise_against_the_trials_spread():
    # the figure: 947 holdout images at ~60% is about 1.6 points of standard error
    trials = pd.DataFrame({"status": ["completed"] * 4 + ["stopped"], "accuracy": [0.58, 0.60, 0.61, 0.61, 0.2],
                           "n_valid": [947.0] * 5})
    s = uncertainty.selection_noise(trials)
    assert s["se_points"] == pytest.approx(100 * math.sqrt(0.6 * 0.4 / 947), rel=1e-3) and s["trials"] == 4
    assert s["spread_points"] == pytest.approx(100 * trials.accuracy[:4].std())
    line = uncertainty.selection_line(s)
    assert "standard error of ±1.6 points" in line and "no more than the noise" in line
    wide = trials.assign(accuracy=[0.40, 0.50, 0.60, 0.70, 0.2])
    assert "well more than the noise" in uncertainty.selection_line(uncertainty.selection_noise(wide))
    assert uncertainty.selection_noise(trials.drop(columns="n_valid")) is None  # a search from before n_valid
