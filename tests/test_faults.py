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

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, cli, make_image_folder, tiny, write_space
from tune_sota import load_history, load_trials

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slower_folder(tmp_path_factory) -> Path:
    """Enough images that an epoch takes about a second: time to lose a node mid-trial."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "bigger", per_class=(80, 10), px=32)


@pytest.fixture
def cluster(request):
    """A head and a worker node: two raylets on this machine, as `ray start` would make on two. The
    head has 2 CPUs unless the test asks for another number (indirect parametrization)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": getattr(request, "param", 2)})
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


def _wait(predicate, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _popen(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "tune_sota.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


# One CPU per node: the two trials that start together cannot both run on the head. (With a bigger
# head, reused actors can run every short trial there.)
@pytest.mark.parametrize("cluster", [1], indirect=True)
def test_multi_node_search_writes_everything_to_shared_storage(cluster, tmp_path, slower_folder):
    c, _ = cluster
    space = write_space(tmp_path / "multi.yaml", {**tiny(slower_folder, epochs=3), "lr": {"loguniform": [1e-3, 1e-2]}},
                        {"num_samples": 4, "max_concurrent": 2, "cpus_per_trial": 1, "grace_period": 3})
    run = cli("search", "--space", space, "--address", c.address, "--storage", tmp_path / "shared",
              "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = load_trials(tmp_path / "results" / "multi")
    assert len(trials) == 4 and trials.node.nunique() == 2, "trials ran on both nodes"
    experiment = tmp_path / "shared" / "multi"
    assert yaml.safe_load((tmp_path / "results" / "multi" / "run.yaml").read_text())["experiment"] == str(experiment)
    for trial_id in trials.trial_id:
        assert (experiment / f"trial_{trial_id}" / "result.json").is_file()
        assert list((experiment / f"trial_{trial_id}").glob("checkpoint_*/state.pt")), "checkpoints in storage"
    assert (tmp_path / "results" / "multi" / "best.yaml").is_file()


def test_lost_node_trials_resume_from_their_checkpoints(cluster, tmp_path, slower_folder):
    c, worker = cluster
    space = write_space(tmp_path / "loss.yaml", tiny(slower_folder, size=32, presize=36, epochs=8),
                        {"num_samples": 3, "max_concurrent": 3, "cpus_per_trial": 1, "grace_period": 8})
    proc = _popen("search", "--space", space, "--address", c.address, "--storage", tmp_path / "shared",
                  "--results", tmp_path / "results")
    experiment = tmp_path / "shared" / "loss"
    on_worker = lambda: [r for r in _results(experiment) if worker.node_id.startswith(r.get("node", "-"))]  # noqa: E731
    _wait(lambda: any(r["epoch"] >= 2 for r in on_worker()), 240, "a trial on the worker to checkpoint", proc)
    lost = {r["trial_id"] for r in on_worker()}
    c.remove_node(worker, allow_graceful=False)
    out, _ = proc.communicate(timeout=480)
    assert proc.returncode == 0, out[-3000:]
    trials, history = load_trials(tmp_path / "results" / "loss"), load_history(tmp_path / "results" / "loss")
    assert (trials.status == "completed").all() and len(trials) == 3
    for trial_id in lost:
        h = history[history.trial_id == trial_id]
        resumed = h[h.start_epoch > 0]
        assert len(resumed), f"{trial_id} was retried from a checkpoint, not from scratch"
        assert resumed.epoch.min() == resumed.start_epoch.min() + 1 and h.epoch.max() == 8


def test_killed_driver_resumes_without_losing_or_repeating_trials(tmp_path, image_folder):
    space = write_space(tmp_path / "killed.yaml",
                        {**tiny(image_folder, epochs=4), "lr": {"loguniform": [1e-3, 1e-2]},
                         "mixup": {"choice": [0.0, 0.2]}},
                        {"num_samples": 6, "max_concurrent": 2, "cpus_per_trial": 1, "startup_trials": 2})
    folder = tmp_path / "results" / "killed"
    proc = _popen("search", "--space", space, "--results", tmp_path / "results")

    def finished() -> pd.DataFrame:
        try:
            study = pd.read_csv(folder / "optuna.csv")
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return pd.DataFrame(columns=["state"])
        return study[study.state.isin(["COMPLETE", "PRUNED"])]

    _wait(lambda: len(finished()) >= 2, 300, "two finished trials", proc)
    time.sleep(3)  # past the experiment's state saving period (2 s)
    before = finished()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray processes it started
    proc.wait()
    assert not (folder / "trials.csv").exists()

    run = cli("search", "--space", space, "--results", tmp_path / "results", "--resume")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "killed done" in run.stdout and "best trial" in run.stdout
    trials, history = load_trials(folder), load_history(folder)
    assert len(trials) == 6, "the total is the number of trials asked for"
    study = pd.read_csv(folder / "optuna.csv")
    assert sorted(study.number) == list(range(6)), "the restored study went on numbering its trials"
    for _, t in before.iterrows():  # the searcher's state came back: the same trials, the same values
        again = study[study.number == t.number].iloc[0]
        assert again.trial_id == t.trial_id and again.state == t.state and again.lr == pytest.approx(t.lr)
        epochs = history[history.trial_id == t.trial_id].epoch
        assert epochs.is_unique and (epochs <= 4).all(), "finished trials were not run again"
    assert (folder / "best.yaml").is_file() and trials.tta_accuracy.notna().any()


def test_diverged_and_failing_trials_are_recorded_and_the_search_goes_on(tmp_path, image_folder):
    broken = make_image_folder(tmp_path / "truncated")
    for f in broken.rglob("*.png"):  # headers intact, pixel data cut off: passes the scan, fails to decode
        f.write_bytes(f.read_bytes()[:60])
    # lr 10 with weight decay 1 multiplies the weights by -9 at every peak step: the loss goes to NaN
    space = write_space(tmp_path / "faults.yaml",
                        {**tiny(image_folder, epochs=12, wd=1.0), "data": {"choice": [str(image_folder), str(broken)]},
                         "lr": {"choice": [0.003, 10.0]}},
                        {"num_samples": 4, "max_concurrent": 2, "cpus_per_trial": 1, "grace_period": 12,
                         "seed": 2, "startup_trials": 4})  # seed 2's first four cover all three outcomes
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
    study = pd.read_csv(tmp_path / "results" / "faults" / "optuna.csv").set_index("trial_id")
    assert (study.loc[list(diverged.trial_id) + list(errors.trial_id), "state"] == "FAIL").all()
