"""Real searches: real Ray on the CPU, real ASHA and Optuna, tiny data made by the tests."""

import dataclasses
import json
import re
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import ALL_FIVE, cli, tiny, write_space
from tune_sota import load_confirm, load_history, load_model, load_trials, recipe
from tune_sota.config import SPACES_DIR, Config, load_space, parse_space
from tune_sota.searcher import RAY_ID, study_url

pytestmark = pytest.mark.slow


def test_search_writes_results_and_summary(searched):
    folder, run = searched
    for name in ("best.yaml", "trials.csv", "history.csv", "study.db", "confirm.csv", "space.yaml", "run.yaml",
                 "state/scheduler.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "scheduler.json").exists(), "state files stay out of the top, which Ray's restore copies"
    assert "stopped early by ASHA" in run.stdout and "judged on a 20% holdout of train/" in run.stdout
    assert "every trial trains 4 epochs, the top of the space's range (search.epochs: max" in run.stdout
    assert "confirmed on val/ over 2 seed(s)" in run.stdout and "with TTA" in run.stdout
    assert "baseline (chapter 7's plain recipe" in run.stdout and "gain: " in run.stdout
    # the gain with its uncertainty, and the noise of the trials' holdout accuracies
    verdict = (r"verdict \(plain accuracy, without TTA\): [+-]\d+\.\d points, 95% interval \[[+-]\d+\.\d, "
               r"[+-]\d+\.\d\] \(Welch's t\): (better than|worse than|not distinguishable from) the recipe")
    assert re.search(verdict, run.stdout), run.stdout
    assert re.search(r"selection noise: a holdout accuracy of \d+% on \d+ images has a standard error", run.stdout)


def test_a_successful_search_prints_only_its_own_lines(searched):
    """No traceback, no Ray notices (token authentication, snapshot frequency), no colour codes in a file."""
    _, run = searched
    said = run.stdout + run.stderr
    for noise in ("Traceback", "Token authentication", "snapshotting", "\x1b[", "WARNING", "(trial pid="):
        assert noise not in said, noise
    assert run.stderr.strip() == "", run.stderr[-2000:]


def test_trial_table(searched):
    folder, _ = searched
    trials = load_trials(folder)
    assert len(trials) == 8
    assert set(trials.status) <= {"completed", "stopped"} and (trials.status == "stopped").any()
    for col in ("trial_id", "status", *ALL_FIVE, "epochs_run", "accuracy", "best_accuracy", "valid_loss",
                "time_s", "confirmed_accuracy", "confirmed_tta"):
        assert col in trials.columns, col
    assert trials.trial_id.map(type).eq(str).all() and trials.resize.isin(["16", "8>16"]).all()
    assert (trials.epochs == 4).all()  # ALL_FIVE's epochs {randint: [2, 4]} held at its top (search.epochs: max)
    assert yaml.safe_load((folder / "space.yaml").read_text())["epochs"] == 4  # what a resume reads
    done = trials[trials.status == "completed"]
    assert (done.epochs_run == done.epochs).all()
    stopped = trials[trials.status == "stopped"]
    assert (stopped.epochs_run < stopped.epochs).all()
    assert trials.confirmed_accuracy.notna().sum() == 1  # confirm_top 1: the best completed trial
    assert trials.confirmed_accuracy.notna().idxmax() == trials[trials.status == "completed"].index[0]


def test_checkpoints_keep_only_the_newest_and_only_of_the_confirmed(searched):
    folder, _ = searched
    trials = load_trials(folder)
    kept = set(trials[trials.status == "completed"].head(1).trial_id)  # confirm_top 1
    for _, t in trials.iterrows():
        n = len(list((folder / f"trial_{t.trial_id}").glob("checkpoint_*")))
        assert (1 <= n <= 2) if t.trial_id in kept else n == 0, (t.trial_id, n)  # keep_checkpoints 2


def test_history_has_every_epoch_of_every_trial(searched):
    folder, _ = searched
    trials, history = load_trials(folder), load_history(folder)
    per_trial = history.groupby("trial_id").epoch.max()
    assert per_trial.to_dict() == dict(zip(trials.trial_id, trials.epochs_run))
    assert set(history.columns) >= {"trial_id", "epoch", "size", "accuracy", "valid_loss", "train_loss"}
    # validation always at the final size: the training size may be smaller, the metric is comparable
    assert set(history["size"]) <= {8, 16}


def test_optuna_learns_asha_stops_as_pruned(searched):
    folder, _ = searched
    study = optuna.load_study(study_name="e2e", storage=study_url(folder))
    trials = load_trials(folder).set_index("trial_id")
    assert len(study.trials) == 8 and {t.user_attrs[RAY_ID] for t in study.trials} == set(trials.index)
    history = load_history(folder)
    for t in study.trials:
        row = trials.loc[t.user_attrs[RAY_ID]]
        h = history[history.trial_id == row.name].set_index("epoch").accuracy
        assert t.intermediate_values == pytest.approx(h.to_dict()), "every epoch reached Optuna"
        if row.status == "stopped":
            assert t.state.name == "PRUNED" and len(t.intermediate_values) < row.epochs
        else:
            assert t.state.name == "COMPLETE" and t.value == pytest.approx(row.accuracy)
    assert any(t.state.name == "PRUNED" for t in study.trials)
    confirmed = study.user_attrs["confirmed"]  # the answer is in the study too
    winner = trials[trials.status == "completed"].index[0]
    assert confirmed["winner"]["trial_id"] == winner and "gain_points" in confirmed
    assert confirmed["gain"]["verdict"] and confirmed["gain"]["low"] <= confirmed["gain"]["points"] <= \
        confirmed["gain"]["high"]
    assert study.trials[confirmed["winner_number"]].user_attrs[RAY_ID] == winner


def test_trials_are_judged_on_a_holdout_and_the_winner_confirmed_on_val(searched):
    folder, _ = searched
    trials, confirm = load_trials(folder), load_confirm(folder)
    for trial_id in trials.trial_id:  # every search trial trained and validated on the holdout
        params = json.loads((folder / f"trial_{trial_id}" / "params.json").read_text())
        assert params["holdout"] == 0.2
    winner = trials[trials.status == "completed"].iloc[0]
    assert sorted(confirm.role) == ["baseline", "baseline", "candidate", "candidate"]
    assert (confirm.error == "").all() and confirm.accuracy.between(0, 1).all() and confirm.tta_accuracy.notna().all()
    assert (confirm[confirm.role == "candidate"].trial_id == winner.trial_id).all()
    for role in ("candidate", "baseline"):
        runs = confirm[confirm.role == role]
        assert sorted(runs.seed) == [42, 43] and (runs.epochs == winner.epochs).all(), "same seeds, same epochs"
    for path in confirm.path:  # what each confirmation run trained: all of train/, the baseline chapter 7's recipe
        spec = json.loads((folder / "confirm" / path.split("/confirm/")[1].split("/")[0] / "params.json")
                          .read_text())["run"]
        assert spec["config"]["holdout"] == 0.0
        if spec["role"] == "baseline":
            assert {k: spec["config"][k] for k in ("lr", "mixup", "label_smoothing", "resize")} == \
                {"lr": 0.003, "mixup": 0.0, "label_smoothing": 0.0, "resize": ""}
        else:
            assert spec["config"]["lr"] == pytest.approx(winner.lr)


def test_best_config_exports_and_retrains(searched):
    folder, _ = searched
    best = yaml.safe_load((folder / "best.yaml").read_text())
    trials, confirm = load_trials(folder), load_confirm(folder)
    top = trials[trials.status == "completed"].iloc[0]
    result = best["result"]
    assert result["trial_id"] == top.trial_id and result["selection_accuracy"] == pytest.approx(top.accuracy)
    mine, base = confirm[confirm.role == "candidate"], confirm[confirm.role == "baseline"]
    assert result["winner"]["accuracy_mean"] == pytest.approx(mine.accuracy.mean())
    assert result["winner"]["accuracy_std"] == pytest.approx(mine.accuracy.std())
    assert result["baseline"]["tta_mean"] == pytest.approx(base.tta_accuracy.mean())
    assert result["gain_points"] == pytest.approx(100 * (mine.accuracy.mean() - base.accuracy.mean()))
    low, high = result["gain_interval_points"]
    assert low < result["gain_points"] < high and result["verdict"] in result["gain_statement"]
    noise = result["selection_noise"]  # 20% of the fixture's 180 train images, stratified
    assert noise["n_valid"] == 36 and noise["se_points"] > 0 and "selection noise" in noise["statement"]
    assert result["cost"]["search_trial_s"] > 0 and result["cost"]["confirm_trial_s"] > 0
    assert result["versions"]["ray"]
    cfg = parse_space(best).fixed()  # a config is a space with nothing left to sample
    assert cfg.lr == pytest.approx(top.lr) and cfg.resize == top.resize and cfg.holdout == 0.0
    # the winner retrained on all of train/ loads as a model and scores on val/ what its confirmation run did
    learn = load_model(result["confirmed_checkpoint"], cpus=1)
    first = mine.iloc[0]
    assert recipe.score(learn, tta=False)["accuracy"] == pytest.approx(first.accuracy, abs=1e-6)
    run = cli("train", "--config", folder / "best.yaml")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"epoch {cfg.epochs}/{cfg.epochs}" in run.stdout and "with TTA" in run.stdout


def test_trials_command_prints_the_table(searched):
    folder, _ = searched
    run = cli("trials", folder)
    assert run.returncode == 0 and run.stdout.splitlines()[0].split()[:2] == ["trial_id", "status"]
    for _, t in load_trials(folder).iterrows():
        assert any(line.split()[:2] == [t.trial_id, t.status] for line in run.stdout.splitlines()), t.trial_id
    runs = cli("trials", folder, "--confirm")
    assert runs.returncode == 0 and runs.stdout.splitlines()[0].split()[:3] == ["role", "rank", "trial_id"]
    assert sum(line.split()[0] in ("candidate", "baseline") for line in runs.stdout.splitlines()[1:]) == 4


def _tiny_weights(folder, image_folder):
    """A state dict of the tiny config's model, as a pretrained weights file."""
    import torch

    from tune_sota import recipe

    path = folder / "weights.pth"
    torch.save(recipe.make_model(Config(**tiny(image_folder)), 10).state_dict(), path)
    return path


def shrunk(path, image_folder, weights=None) -> tuple[dict, dict]:
    """A shipped space shrunk to tiny data and sizes: (values, search settings) of a two-trial search; a
    fine-tuning space starts from `weights` (a file `_tiny_weights` makes: no network, no bench)."""
    space = load_space(path.stem)
    values = {k: (v.to_yaml() if hasattr(v, "to_yaml") else v) for k, v in space.values.items()}
    values.update(tiny(image_folder), epochs={"randint": [1, 2]}, resize={"choice": ["16", "8>16"]})
    if "pool" in values:  # pool: max needs sizes that are multiples of 32; the tiny ones are 8 and 16
        values["pool"] = "avg"
    if values.get("pretrained", False) is not False:  # fine-tuning: from weights made here (no network, no bench)
        values.update(pretrained=str(weights or "weights.pth"), epochs={"randint": [3, 4]})
    search = {**dataclasses.asdict(space.search), "num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1,
              "gpus_per_trial": 0, "confirm_top": 0}  # confirmation: the shared search and tests/test_faults.py
    return values, search


# Settings that cannot change a two-trial smoke run: both trials are start-up (random) trials, none is confirmed.
_INERT = ("startup_trials", "seed", "confirm_seeds")


def _options(v, priors: bool = False):
    """What a value may be, as ('set', values) or ('range', low, high); a distribution's prior counts only
    where the search uses priors."""
    if isinstance(v, dict) and not priors:
        v = {k: x for k, x in v.items() if k not in ("prior", "confidence")}
    if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("uniform", "loguniform", "randint"):
        return ("range", *next(iter(v.values())))
    if isinstance(v, dict) and list(v) == ["choice"]:
        return ("set", set(map(repr, v["choice"])))
    return ("set", {repr(v)})


def covers(big: tuple[dict, dict], small: tuple[dict, dict]) -> bool:
    """Whether a smoke run of shrunk space `big` runs everything shrunk space `small` can: the same search
    settings (but the inert ones), and every value of `small` among those `big` may take (a key left out means
    Config's default)."""
    (bv, bs), (sv, ss) = big, small
    if {k: v for k, v in bs.items() if k not in _INERT} != {k: v for k, v in ss.items() if k not in _INERT}:
        return False
    default = {f.name: f.default for f in dataclasses.fields(Config)}
    for key in set(bv) | set(sv):
        priors = bs.get("priors", "off") != "off"
        b, s_ = _options(bv.get(key, default.get(key)), priors), _options(sv.get(key, default.get(key)), priors)
        if b[0] == "set" and s_[0] == "set" and not s_[1] <= b[1]:
            return False
        if b[0] == "range" and (s_[0] != "range" or not b[1] <= s_[1] <= s_[2] <= b[2]):
            return False
        if b[0] == "set" and s_[0] == "range":
            return False
    return True


def smoke_groups(image_folder) -> dict[str, list[str]]:
    """Each shipped space that no other covers, with the spaces it covers (two near-copies run once)."""
    spaces = {p.stem: shrunk(p, image_folder) for p in sorted(SPACES_DIR.glob("*.yaml"))}
    covered_by = {}
    for name, sp in spaces.items():
        others = [o for o in spaces if o != name and covers(spaces[o], sp)
                  and not (covers(sp, spaces[o]) and o > name)]  # of two equal spaces, the first runs
        if others:
            covered_by[name] = others[0]
    runs = {name: [] for name in spaces if name not in covered_by}
    for name, by in covered_by.items():
        while by in covered_by:
            by = covered_by[by]
        runs[by].append(name)
    return runs


def test_smoke_groups_run_every_space_that_differs(tmp_path):
    """imagenette-cpu searches a subset of imagenette-cpu-wide with the same settings: one run covers both.
    A space that differs in one value, or in its search settings, still runs."""
    groups = smoke_groups(tmp_path)
    assert groups["imagenette-cpu-wide"] == ["imagenette-cpu"] and "imagenette-cpu" not in groups
    assert {"quick", "imagenette", "imagenette-5ep"} <= set(groups)
    wide = shrunk(SPACES_DIR / "imagenette-cpu-wide.yaml", tmp_path)
    cpu = shrunk(SPACES_DIR / "imagenette-cpu.yaml", tmp_path)
    assert covers(wide, cpu) and not covers(cpu, wide)
    assert not covers(wide, ({**cpu[0], "mixup": {"choice": [0.0, 0.3]}}, cpu[1]))
    assert not covers(wide, (cpu[0], {**cpu[1], "scheduler": "fifo"}))
    assert not covers(wide, ({**cpu[0], "label_smoothing": {"uniform": [0.0, 0.3]}}, cpu[1]))


SMOKE = smoke_groups(Path("data"))  # the grouping does not depend on where the data is


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_every_search_space_smoke_runs(name, tmp_path, image_folder):
    """Each shipped space, shrunk to tiny data and sizes, runs a real two-trial search (under a new name:
    its own is taken by an earlier search's results, which stay as they were). A space another covers
    (`smoke_groups`) is shrunk and checked as a space, and that space's run stands for it."""
    weights = _tiny_weights(tmp_path, image_folder)
    for covered in SMOKE[name]:
        values, search = shrunk(SPACES_DIR / f"{covered}.yaml", image_folder, weights)
        small = write_space(tmp_path / f"{covered}.yaml", values, search)
        parse_space(yaml.safe_load(small.read_text()))
    path = SPACES_DIR / f"{name}.yaml"
    small = write_space(tmp_path / f"{name}.yaml", *shrunk(path, image_folder, weights))
    taken = tmp_path / "results" / path.stem  # an earlier search's results: a new search never touches them
    taken.mkdir(parents=True)
    (taken / "best.yaml").write_text("precious: true\n")
    run = cli("search", "--space", small, "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"'{path.stem}' was taken, so this search is '{path.stem}-2'" in run.stdout
    assert (taken / "best.yaml").read_text() == "precious: true\n" and len(list(taken.iterdir())) == 1
    folder = tmp_path / "results" / f"{path.stem}-2"
    assert len(load_trials(folder)) == 2 and (folder / "best.yaml").is_file()
