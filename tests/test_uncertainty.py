"""The gain's interval, verdict and seeds, and the selection noise, against figures worked by hand."""

import math

import pandas as pd
import pytest

from tune_sota import uncertainty


def test_welch_interval_is_the_hand_worked_one():
    """Worked by hand: means 0.63 and 0.60625, variances 1.0e-4 and 2.229e-4, so se^2 = 1e-4/3 + 2.229e-4/4 =
    8.906e-5 and the Welch-Satterthwaite df = 4.986; t(0.975, 4.986) = 2.5727 (t tables: 2.571 at 5 df), a
    half-width of 2.5727 x sqrt(8.906e-5) = 2.428 points around a gain of 2.375."""
    g = uncertainty.gain([0.62, 0.64, 0.63], [0.61, 0.625, 0.60, 0.59])
    assert g["points"] == pytest.approx(2.375) and g["df"] == pytest.approx(4.986, abs=1e-3)
    assert (g["low"], g["high"]) == pytest.approx((2.375 - 2.428, 2.375 + 2.428), abs=1e-3)
    assert g["seeds"] == [3, 4] and g["verdict"] == "not distinguishable from the recipe with 3 and 4 seeds"


def test_identical_runs_give_a_zero_width_interval():
    g = uncertainty.gain([0.7, 0.7], [0.6, 0.6])  # no spread: scipy's interval would be NaN
    assert g["low"] == g["high"] == pytest.approx(10.0) and g["verdict"] == "better than the recipe"


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
