"""Real searches: real Ray on the CPU, real ASHA and Optuna, tiny data made by the tests."""

import json

import pandas as pd
import pytest
import yaml

from tests.conftest import cli, tiny, write_space
from tune_sota import load_history, load_trials
from tune_sota.config import SPACES_DIR, load_space, parse_space

pytestmark = pytest.mark.slow

ALL_FIVE = {
    "lr": {"loguniform": [1.0e-5, 5.0e-2]},  # wide, so that ASHA has clearly weak trials to stop
    "epochs": {"randint": [2, 4]},
    "mixup": {"choice": [0.0, 0.4]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "resize": {"choice": ["16", "8>16"]},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory, image_folder):
    """One real search through the CLI, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("search")
    space = write_space(tmp / "e2e.yaml", {**tiny(image_folder), **ALL_FIVE},
                        {"num_samples": 8, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 4,
                         "startup_trials": 3, "cpus_per_trial": 1})
    run = cli("search", "--space", space, "--results", tmp / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp / "results" / "e2e", run


def test_search_writes_results_and_summary(searched):
    folder, run = searched
    for name in ("best.yaml", "trials.csv", "history.csv", "optuna.csv", "space.yaml", "run.yaml"):
        assert (folder / name).is_file(), name
    assert "best trial" in run.stdout and "with TTA" in run.stdout and "stopped early by ASHA" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_trial_table(searched):
    folder, _ = searched
    trials = load_trials(folder)
    assert len(trials) == 8
    assert set(trials.status) <= {"completed", "stopped"} and (trials.status == "stopped").any()
    for col in ("trial_id", "status", *ALL_FIVE, "epochs_run", "accuracy", "best_accuracy", "valid_loss",
                "time_s", "tta_accuracy"):
        assert col in trials.columns, col
    assert trials.trial_id.map(type).eq(str).all() and trials.resize.isin(["16", "8>16"]).all()
    done = trials[trials.status == "completed"]
    assert (done.epochs_run == done.epochs).all()
    stopped = trials[trials.status == "stopped"]
    assert (stopped.epochs_run < stopped.epochs).all()
    assert trials.tta_accuracy.notna().sum() == 1  # score_top defaults to the single best


def test_checkpoints_keep_only_the_newest(searched):
    folder, _ = searched
    for trial in folder.glob("trial_*"):
        assert 1 <= len(list(trial.glob("checkpoint_*"))) <= 2, trial  # keep_checkpoints defaults to 2


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
    study = pd.read_csv(folder / "optuna.csv")
    trials = load_trials(folder).set_index("trial_id")
    assert len(study) == 8
    for _, t in study.iterrows():
        row = trials.loc[t.trial_id]
        steps = json.loads(t.intermediate)
        assert len(steps) == row.epochs_run, "every epoch reached Optuna as an intermediate value"
        if row.status == "stopped":
            # Optuna keeps a pruned trial's last intermediate value; TPE ranks it below complete trials
            assert t.state == "PRUNED" and (pd.isna(t.value) or t.value == pytest.approx(steps[-1]))
        else:
            assert t.state == "COMPLETE" and t.value == pytest.approx(row.accuracy)


def test_best_config_exports_and_retrains(searched):
    folder, _ = searched
    best = yaml.safe_load((folder / "best.yaml").read_text())
    trials = load_trials(folder)
    top = trials[trials.status == "completed"].iloc[0]
    assert best["result"]["trial_id"] == top.trial_id
    assert best["result"]["accuracy"] == pytest.approx(top.accuracy)
    assert 0 <= best["result"]["tta_accuracy"] <= 1 and best["result"]["versions"]["ray"]
    cfg = parse_space(best).fixed()  # a config is a space with nothing left to sample
    assert cfg.lr == pytest.approx(top.lr) and cfg.resize == top.resize
    run = cli("train", "--config", folder / "best.yaml")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"epoch {cfg.epochs}/{cfg.epochs}" in run.stdout and "with TTA" in run.stdout


def test_trials_command_prints_the_table(searched):
    folder, _ = searched
    run = cli("trials", folder)
    assert run.returncode == 0 and "trial_id" in run.stdout and run.stdout.count("\n") >= 9


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_search_space_smoke_runs(path, tmp_path, image_folder):
    """Each shipped space, shrunk to tiny data and sizes, runs a real two-trial search."""
    space = load_space(path.stem)
    values = {k: (v.to_yaml() if hasattr(v, "to_yaml") else v) for k, v in space.values.items()}
    values.update(tiny(image_folder), epochs={"randint": [1, 2]}, resize={"choice": ["16", "8>16"]})
    shrunk = write_space(tmp_path / f"{path.stem}.yaml", values,
                         {"num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1, "gpus_per_trial": 0})
    run = cli("search", "--space", shrunk, "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(load_trials(tmp_path / "results" / path.stem)) == 2
