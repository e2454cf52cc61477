"""What real clusters do to a search: several nodes, a node lost, the driver killed, trials that
diverge or raise. Real Ray (several raylets on this machine), real fastai, real Optuna."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import ROOT, cli, make_image_folder, tiny, write_space
from tune_sota import load_confirm, load_history, load_trials
from tune_sota.searcher import RAY_ID, study_url

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    """A head (2 CPUs) and a worker node (1 CPU): two raylets on this machine, as `ray start` would make on two."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


def _results(folder: Path) -> list[dict]:
    """Every result line of every trial written so far under a Ray experiment folder."""
    out = []
    for f in folder.glob("trial_*/result.json"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _wait(predicate, timeout: float, what: str, proc=None, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _popen(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "tune_sota.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_cluster_search_keeps_everything_in_shared_storage_and_survives_a_lost_node(cluster, tmp_path,
                                                                                     slower_folder):
    # Three trials at once on 2 + 1 CPUs: one of them certainly starts on the worker node, which is then lost.
    c, worker = cluster
    space = write_space(tmp_path / "loss.yaml", tiny(slower_folder, size=32, presize=36, epochs=8),
                        {"num_samples": 3, "max_concurrent": 3, "cpus_per_trial": 1, "scheduler": "fifo",
                         "confirm_top": 1, "confirm_seeds": 1, "checkpoint_every": 1})  # lost after epoch 2
    proc = _popen("search", "--space", space, "--address", c.address, "--storage", tmp_path / "shared",
                  "--results", tmp_path / "results")
    experiment, folder = tmp_path / "shared" / "loss", tmp_path / "results" / "loss"
    on_worker = lambda: [r for r in _results(experiment) if worker.node_id.startswith(r.get("node", "-"))]  # noqa: E731
    # polled often: the worker's trial has 6 epochs of a fraction of a second left once it has checkpointed
    _wait(lambda: any(r["epoch"] >= 2 for r in on_worker()), 240, "a trial on the worker to checkpoint", proc,
          every=0.05)
    lost = {r["trial_id"] for r in on_worker()}
    c.remove_node(worker, allow_graceful=False)
    out, _ = proc.communicate(timeout=480)
    assert proc.returncode == 0, out[-3000:]
    trials, history = load_trials(folder), load_history(folder)
    assert (trials.status == "completed").all() and len(trials) == 3
    assert history.node.nunique() == 2, "trials ran on both nodes"
    for trial_id in lost:
        h = history[history.trial_id == trial_id]
        resumed = h[h.start_epoch > 0]
        assert len(resumed), f"{trial_id} was retried from a checkpoint, not from scratch"
        assert resumed.epoch.min() == resumed.start_epoch.min() + 1 and h.epoch.max() == 8

    # Everything Ray wrote is in the shared storage; the results folder says where.
    assert yaml.safe_load((folder / "run.yaml").read_text())["experiment"] == str(experiment)
    for trial_id in trials.trial_id:
        assert (experiment / f"trial_{trial_id}" / "result.json").is_file()
    best = yaml.safe_load((folder / "best.yaml").read_text())["result"]
    winner = experiment / f"trial_{best['trial_id']}"
    assert list(winner.glob("checkpoint_*/state.pt")), "the winner's checkpoints are in the shared storage"
    runs = list((experiment / "confirm").glob("run_*/checkpoint_*/state.pt"))
    assert len(runs) == 2, "the confirmation (winner and baseline, one seed) ran with its checkpoints in storage"


def _study(folder: Path, name: str) -> list:
    """The search's Optuna study as it stands on disk (empty until the searcher has created it)."""
    try:
        return optuna.load_study(study_name=name, storage=study_url(folder)).trials
    except Exception:  # not created yet, or the driver is writing to it this instant
        return []


def test_diverged_and_failing_trials_are_recorded_and_the_search_goes_on(tmp_path, image_folder):
    broken = make_image_folder(tmp_path / "truncated")
    for f in broken.rglob("*.png"):  # headers intact, pixel data cut off: passes the scan, fails to decode
        f.write_bytes(f.read_bytes()[:60])
    # lr 10 with weight decay 1 multiplies the weights by -9 at every peak step: the loss goes to NaN
    space = write_space(tmp_path / "faults.yaml",
                        {**tiny(image_folder, epochs=12, wd=1.0), "data": {"choice": [str(image_folder), str(broken)]},
                         "lr": {"choice": [0.003, 10.0]}},
                        {"num_samples": 4, "max_concurrent": 2, "cpus_per_trial": 1, "scheduler": "fifo",
                         "confirm_top": 0, "seed": 2,
                         "startup_trials": 4})  # seed 2's first four cover all three outcomes
    run = cli("search", "--space", space, "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = load_trials(tmp_path / "results" / "faults")
    assert set(trials.status) == {"completed", "diverged", "error"}, trials[["status", "lr", "data", "error"]]
    diverged = trials[trials.status == "diverged"]
    assert (diverged.lr == 10.0).all() and (diverged.epochs_run < 12).all()
    errors = trials[trials.status == "error"]
    assert (errors.data == str(broken)).all() and errors.error.str.contains("truncated|OSError|image", case=False).all()
    best = yaml.safe_load((tmp_path / "results" / "faults" / "best.yaml").read_text())
    assert best["result"]["trial_id"] in set(trials[trials.status == "completed"].trial_id)
    assert "diverged:" in run.stdout and "error:" in run.stdout
    study = {t.user_attrs[RAY_ID]: t.state.name for t in _study(tmp_path / "results" / "faults", "faults")}
    assert {study[t] for t in list(diverged.trial_id) + list(errors.trial_id)} == {"FAIL"}


def test_a_driver_killed_twice_resumes_without_losing_or_repeating_work(tmp_path, image_folder):
    """Killed (SIGKILL, driver and local Ray) mid-search, resumed, killed again mid-confirmation, resumed."""
    space = write_space(tmp_path / "killed.yaml",
                        {**tiny(image_folder, epochs=4), "lr": {"loguniform": [1e-3, 1e-2]},
                         "mixup": {"choice": [0.0, 0.2]}},
                        {"num_samples": 6, "max_concurrent": 2, "cpus_per_trial": 1, "startup_trials": 2,
                         "confirm_top": 1, "confirm_seeds": 3,  # 3 runs of the winner + 3 of the baseline
                         # Ray snapshots its state at once after num_to_keep checkpoints of a trial, else every
                         # 2 s: with a checkpoint each epoch, a trial that ended just before the kill is known
                         # to have ended (with sparser ones it may rerun the epochs since its last but one)
                         "checkpoint_every": 1})
    folder = tmp_path / "results" / "killed"

    def finished() -> list:
        return [t for t in _study(folder, "killed") if t.state.name in ("COMPLETE", "PRUNED")]

    def finished_runs() -> dict:
        runs = {}
        for f in (folder / "confirm").glob("run_*/result.json"):
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            if rows and "tta_accuracy" in rows[-1]:  # a confirmation's last report carries its TTA score
                runs[f.parent.name] = rows
        return runs

    # Killed the moment a second trial has ended: four of six trials are still to run, whatever the
    # machine's speed, so the search is certainly mid-way (no sleep racing a timer).
    proc = _popen("search", "--space", space, "--results", tmp_path / "results")
    _wait(lambda: len(finished()) >= 2, 300, "two finished trials", proc, every=0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray processes it started
    proc.wait()
    before = finished()
    assert not (folder / "trials.csv").exists(), "the search was still running when it was killed"

    # Resumed, and killed again once two of the six confirmation runs have ended.
    proc = _popen("search", "--resume", "killed", "--results", tmp_path / "results")
    _wait(lambda: len(finished_runs()) >= 2, 400, "two finished confirmation runs", proc, every=0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    runs_before = finished_runs()
    assert len(runs_before) < 6 and not (folder / "confirm.csv").exists(), "killed during the confirmation"

    run = cli("search", "--resume", "killed", "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "killed done" in run.stdout and "confirmed on val/" in run.stdout
    trials, history = load_trials(folder), load_history(folder)
    assert len(trials) == 6, "the total is the number of trials asked for"
    assert not trials.duplicated(["lr", "mixup"]).any(), "a resumed search ran a config again"
    study = {t.user_attrs[RAY_ID]: t for t in _study(folder, "killed")}
    assert set(trials.trial_id) <= set(study), "every Ray trial is in the study"
    assert all(t.state.name == "FAIL" for rid, t in study.items() if rid not in set(trials.trial_id)), \
        "trials asked of the study but never recorded by Ray (killed in between) are closed as failed"
    for t in before:  # the searcher's state came back: the same trials, the same values
        again = study[t.user_attrs[RAY_ID]]
        assert again.number == t.number and again.state == t.state and again.params == t.params
        epochs = history[history.trial_id == t.user_attrs[RAY_ID]].epoch
        assert epochs.is_unique and (epochs <= 4).all(), "the history has one row per epoch"
        # Ray's own record of the trial: each epoch trained once; a trial that had finished before Ray
        # saved that fact may state its last epoch once more, restored (start_epoch 4), not retrained.
        path = Path(trials.set_index("trial_id").path[t.user_attrs[RAY_ID]]) / "result.json"
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        trained = [r["epoch"] for r in reports if r["start_epoch"] < r["epoch"]]
        assert sorted(trained) == sorted(set(trained)), f"finished trial {t.number} was trained again: {trained}"
        assert all(r["start_epoch"] == 4 for r in reports if r["start_epoch"] >= r["epoch"])

    confirm = load_confirm(folder)
    assert len(confirm) == 6 and (confirm.error == "").all()
    assert sorted(confirm[confirm.role == "candidate"].seed) == sorted(confirm[confirm.role == "baseline"].seed) \
        == [42, 43, 44]
    after = finished_runs()
    for name, rows in runs_before.items():  # finished runs were not trained again (at most said again)
        again = after[name][len(rows):]
        assert after[name][:len(rows)] == rows and all(r["start_epoch"] == 4 for r in again), name
    assert (folder / "best.yaml").is_file()


def test_a_search_in_which_every_trial_fails_exits_non_zero_with_the_first_error(tmp_path):
    broken = make_image_folder(tmp_path / "cut", per_class=(6, 3))
    for f in (broken / "train").rglob("*.png"):  # headers intact: passes the checks, fails in every trial
        f.write_bytes(f.read_bytes()[:60])
    space = write_space(tmp_path / "doomed.yaml", {**tiny(broken, batch_size=4), "lr": {"choice": [0.003, 0.01]}},
                        {"num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1})
    run = cli("search", "--space", space, "--results", tmp_path / "results")
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no best config to export; the first error: " in run.stdout and "could not be decoded" in run.stdout
    assert not (tmp_path / "results" / "doomed" / "best.yaml").exists()
    assert "Traceback" not in run.stdout + run.stderr
