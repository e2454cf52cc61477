"""Stop, resume, keep: Ctrl-C is a state and `--resume` finds the right search (real Ray, real
signals), a trained model loads again, and the command line's `--set` is checked like a file."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, cli, make_image_folder, tiny, write_space
from tests.test_cli import assert_one_line_error, run_main
from tests.test_faults import _popen, _results, _wait
from tune_sota import load_history, load_model, load_trials, recipe, runstate, scheduler
from tune_sota.config import ConfigError, load_space, parse_space
from tune_sota.results import edge_notes


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rungs(folder: Path) -> dict:
    """ASHA's rung records as the search saved them (state/scheduler.json with its journal replayed): {share:
    {trial: accuracy}}, the share keys only (the file also holds each trial's schedule shape, `groups`, and the
    epoch it was judged at, `judged_at`)."""
    saved = scheduler.read_state(folder / "state" / "scheduler.json")
    return {k: v for k, v in saved.items() if k not in ("groups", "judged_at")}


def _resume_argv(line: str) -> list[str]:
    """The printed `tune-sota search --resume ...` as arguments for `python -m tune_sota.cli`."""
    command = line.split("resume with: ", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[:3] == ["tune-sota", "search", "--resume"], command
    return argv[1:]


@pytest.mark.slow
def test_ctrl_c_stops_at_checkpoints_then_the_printed_command_resumes(tmp_path, slower_folder):
    # 6 epochs a trial, one rung at epoch 3, checkpoints at 3, 5 and 6: Ctrl-C once the first trial has been
    # judged at the rung lands while it certainly runs (it stops at its epoch-5 checkpoint), however fast.
    # Seed 3 draws (4 start-up trials, so each config is fixed by its number) lr 8.3e-3, 3.2e-5, 1.3e-5 and
    # 7.0e-3: whichever of the first two reaches the rung first, one of the two tiny learning rates is judged
    # after a far better trial and is stopped there.
    space = write_space(tmp_path / "sig.yaml", {**tiny(slower_folder, epochs=6, size=32, presize=32),
                                                "lr": {"loguniform": [1e-5, 1e-2]}},
                        {"num_samples": 4, "max_concurrent": 2, "cpus_per_trial": 1, "startup_trials": 4,
                         "seed": 3, "scheduler": "asha", "grace": 0.5, "reduction_factor": 2, "confirm_top": 0})
    results = tmp_path / "results"
    (results / "sig").mkdir(parents=True)  # taken: the search is named sig-2, and the command must say so
    folder = results / "sig-2"
    proc = _popen("search", "--space", space, "--results", results)
    # polled often: on a 2-core CI box the judged trial's two epochs to its next checkpoint take about 0.6 s
    # (polling every 0.5 s, one CI run in four saw it finish before the Ctrl-C)
    _wait(lambda: _rungs(folder).get("0.5"), 300, "a trial judged at the 50% rung", proc, every=0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole foreground group
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "stopping:" in out and "at their next checkpoint" in out
    assert "Tuner.restore" not in out and "Traceback" not in out
    resume_line = [line for line in out.splitlines() if "resume with:" in line]
    assert len(resume_line) == 1 and "--resume sig-2" in resume_line[0], out[-3000:]
    assert not (folder / "best.yaml").exists() and not (folder / "trials.csv").exists()
    assert yaml.safe_load((folder / "run.yaml").read_text())["status"] == "interrupted"
    cut = load_trials(folder)
    assert "interrupted" in set(cut.status) and set(cut.status) <= {"interrupted", "completed", "stopped"}, cut
    assert re.search(r"sig-2 interrupted after \S+: \d+ trials \((.*, )?\d+ interrupted[,)]", out), out[-3000:]
    ended_before = int(cut.status.isin(["completed", "stopped"]).sum())
    interrupted = cut[(cut.status == "interrupted") & (cut.epochs_run > 0)]
    assert len(interrupted) >= 1, cut  # the trial judged first went on, and Ctrl-C stopped it at a checkpoint
    rungs_before = _rungs(folder)
    assert rungs_before["0.5"], rungs_before

    resumed = subprocess.run([sys.executable, "-m", "tune_sota.cli", *_resume_argv(resume_line[0])], cwd=ROOT,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials, history = load_trials(folder), load_history(folder)
    assert len(trials) == 4 and set(trials.status) <= {"completed", "stopped"}, trials
    assert trials.lr.is_unique, "a resumed search ran a config again"
    # A trial judged at the rung in the instant Ctrl-C came may have been stopped there, Ray not yet having
    # saved that: it is `interrupted` in the cut table, `stopped` at the rung (epoch 3) after the resume, and
    # trains no more. Every other interrupted trial went on from its checkpoint, not from epoch 1.
    final = trials.set_index("trial_id")
    at_cut = [t for t in interrupted.trial_id if final.status[t] == "stopped" and final.epochs_run[t] == 3]
    went_on = [t for t in interrupted.trial_id if t not in at_cut]
    assert went_on, (cut, trials)  # the trial judged first went on, and Ctrl-C stopped it at its next checkpoint
    for trial_id in went_on:
        h = history[history.trial_id == trial_id]
        assert h.epoch.is_unique and (h.start_epoch > 0).any(), h
    # ASHA's rung records came back: what was recorded before Ctrl-C is still there, unchanged (a trial that
    # passed the 50% rung was not judged again against an empty rung), and every stop is on that rung.
    rungs = _rungs(folder)
    assert set(rungs) == set(rungs_before) == {"0.5"}
    assert rungs_before["0.5"].items() <= rungs["0.5"].items(), (rungs_before, rungs)
    half = rungs["0.5"]
    assert set(half) == set(trials.trial_id), half  # every trial reached epoch 3 of 6 and was judged there
    judged_at = scheduler.read_state(folder / "state" / "scheduler.json")["judged_at"]
    status = trials.set_index("trial_id").status
    seen = []
    for trial_id, value in half.items():  # in the order ASHA judged them: below the median so far is stopped
        assert (status[trial_id] == "stopped") == (bool(seen) and value < np.percentile(seen, 50)), (half, status)
        assert judged_at[trial_id] == 3
        seen.append(value)
    stopped = trials[trials.status == "stopped"]
    assert len(stopped) >= 1, trials  # a tiny learning rate was judged after a far better trial
    for _, t in stopped.iterrows():
        assert t.epochs_run == 3 and half[t.trial_id] < max(half.values()), t
    counters = [int(n) for n in re.findall(r"\[(\d+)/4\]", resumed.stdout)]
    assert counters and counters[0] in (ended_before + 1, ended_before + 1 + len(at_cut)) and counters[-1] == 4, \
        resumed.stdout[-3000:]
    assert yaml.safe_load((folder / "run.yaml").read_text())["status"] == "finished"
    assert (folder / "best.yaml").is_file() and "disk:" in resumed.stdout

    # best.yaml's checkpoint is a model: the winner's selection accuracy comes back
    best = yaml.safe_load((folder / "best.yaml").read_text())["result"]
    learn = load_model(folder / "best.yaml", cpus=1)
    assert recipe.score(learn, tta=False)["accuracy"] == pytest.approx(best["selection_accuracy"], abs=1e-6)
    assert len(list(folder.glob("trial_*/checkpoint_*"))) >= 1
    pruned = [d for d in folder.glob("trial_*") if d.name != f"trial_{best['trial_id']}"]
    assert pruned and not any(list(d.glob("checkpoint_*")) for d in pruned), "only the winner keeps checkpoints"

    # a finished search is never resumed: it says so, exits 2, and not a byte changes
    before = _hashes(folder)
    again = cli(*_resume_argv(resume_line[0]))
    assert again.returncode == 2 and "has finished" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert _hashes(folder) == before


def _read_until(proc, text: str) -> str:
    """Read the search's output line by line (as it comes, no polling delay) until a line holds `text`."""
    for line in proc.stdout:
        if text in line:
            return line
    raise AssertionError(f"the search ended (rc {proc.wait()}) before printing {text!r}")


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tmp_path, slower_folder):
    # the second Ctrl-C lands milliseconds after the stopping line, long before the trials' next checkpoints
    space = write_space(tmp_path / "twice.yaml", {**tiny(slower_folder, epochs=20, size=32, presize=36)},
                        {"num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1, "scheduler": "fifo",
                         "confirm_top": 0})
    results = tmp_path / "results"
    proc = _popen("search", "--space", space, "--results", results)
    folder = results / "twice"
    _wait(lambda: any(r["epoch"] >= 1 for r in _results(folder)), 300, "a trial's first epoch", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _read_until(proc, "stopping:")
    os.killpg(proc.pid, signal.SIGINT)  # now: no waiting for the running trials' next checkpoints
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "stopped mid-epoch; they go on from their last checkpoint" in out, out[-3000:]
    assert "resume with: tune-sota search --resume twice" in out
    assert set(load_trials(folder).status) == {"interrupted"}
    assert yaml.safe_load((folder / "run.yaml").read_text())["status"] == "interrupted"


def test_resume_by_space_name_lists_candidates_when_ambiguous(tmp_path, capsys):
    results = tmp_path / "results"
    for name, status in (("quick", "finished"), ("quick-2", "interrupted"), ("quick-3", "running"),
                         ("other", "interrupted")):
        (results / name).mkdir(parents=True)
        (results / name / "space.yaml").write_text("data: digits\n")
        (results / name / "run.yaml").write_text(yaml.safe_dump({"name": name, "space": name.split("-")[0],
                                                                 "status": status}))
    before = _hashes(results)
    code, err = run_main(capsys, "search", "--space", "quick", "--resume", "--results", results)
    assert_one_line_error(code, err, "2 unfinished searches of space 'quick'", "quick-2 (interrupted)",
                          "quick-3 (running)", "--resume quick-3")
    code, err = run_main(capsys, "search", "--resume", "quick", "--results", results)
    assert_one_line_error(code, err, "--resume quick: that search has finished", "nothing was changed")
    code, err = run_main(capsys, "search", "--resume", "quick-2", "--num-samples", "9", "--results", results)
    assert_one_line_error(code, err, "--resume continues a search as it was started", "drop --num-samples")
    assert _hashes(results) == before
    assert runstate.target(results, None, "other") == "other"
    (results / "quick-3" / "run.yaml").write_text(yaml.safe_dump({"space": "quick", "status": "finished"}))
    assert runstate.target(results, None, "quick") == "quick-2"
    # folders from before run.yaml had a status: finished when they wrote their tables
    legacy = results / "old"
    legacy.mkdir()
    (legacy / "space.yaml").write_text("data: digits\n")
    assert runstate.status(legacy) == "running"
    (legacy / "trials.csv").write_text("trial_id\n")
    assert runstate.status(legacy) == "finished"
    # killed after claiming its name but before writing its space: no search there, one line says so
    claimed = results / "claimed"
    claimed.mkdir()
    (claimed / "run.yaml").write_text(yaml.safe_dump({"space": "quick", "status": "running"}))
    code, err = run_main(capsys, "search", "--resume", "claimed", "--results", results)
    assert_one_line_error(code, err, "--resume claimed:", "holds no search to resume")


@pytest.mark.slow
def test_trained_model_loads_and_reproduces_its_printed_accuracy(tmp_path, image_folder):
    config = write_space(tmp_path / "one.yaml", tiny(image_folder, epochs=1, lr=1e-4))
    run = cli("train", "--config", config, "--cpus", "1", "--set", "seed=3")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = float(re.search(r"^accuracy (\d\.\d{4}), with TTA", run.stdout, re.M).group(1))
    out = tmp_path / "model"  # the default: beside the config
    assert {p.name for p in out.iterdir()} == {"state.pt", "config.yaml", "scores.json"}
    assert f"load_model('{out}')" in run.stdout
    learn = load_model(out, cpus=1)
    assert learn.config.seed == 3  # the resolved config, --set included
    assert round(recipe.score(learn, tta=False)["accuracy"], 4) == printed
    image = sorted((image_folder / "val" / "red").iterdir())[0]
    label, index, probs = learn.predict(image)
    assert label in ("red", "green", "blue") and probs.shape == (3,)
    # never overwritten: an --out that exists is refused before any training
    again = cli("train", "--config", config, "--out", out)
    assert again.returncode == 2 and "exists" in again.stderr and "epoch" not in again.stdout


def test_set_overrides_are_checked_like_the_file(tmp_path, capsys):
    (tmp_path / "spaces").mkdir()
    space = tmp_path / "spaces" / "s.yaml"
    space.write_text("data: no_such_data\nlr: {loguniform: [1.0e-3, 1.0e-2]}\nsearch: {num_samples: 2}\n")
    # the file alone cannot search (its data is nowhere); --set fixes it, and numbers like 1e-3 are numbers
    s = load_space(str(space), ["data=digits", "lr={loguniform: [1e-3, 3e-2]}", "epochs=3"])
    assert s.values["data"] == "digits" and s.values["lr"].args == (1e-3, 3e-2) and s.values["epochs"] == 3
    assert load_space(str(space), ["lr=0.01"]).values["lr"] == 0.01
    for argv, fragments in [
        (["--set", "lr=abc"], ["with --set lr=abc: lr: 'abc' is not a number"]),
        (["--set", "lrr=0.1"], ["unknown key 'lrr'", "allowed: data, arch"]),
        (["--set", "search.num_sample=4"], ["unknown key 'num_sample'"]),
        (["--set", "lr"], ["--set lr: expected KEY=VALUE"]),
        (["--set", "lr={loguniform: [0.1, 0.001]}"], ["range [0.1, 0.001] is empty"]),
        (["--set", "search.keep_checkpoints=some"], ["keep_checkpoints: 'some' is not allowed", "'all'"]),
        ([], ["is neither a folder nor a known dataset"]),
    ]:
        code, err = run_main(capsys, "search", "--space", space, "--results", tmp_path / "r", *argv)
        assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "r").exists()


def test_relative_data_is_read_from_the_space_file_folder(tmp_path, capsys, monkeypatch):
    make_image_folder(tmp_path / "spaces" / "imgs", per_class=(4, 2), px=12)
    (tmp_path / "spaces" / "s.yaml").write_text("data: imgs\n")
    monkeypatch.chdir(tmp_path)  # not where the data is
    assert load_space("spaces/s.yaml").values["data"] == str(tmp_path / "spaces" / "imgs")
    (tmp_path / "spaces" / "t.yaml").write_text("data: {choice: [imgs, digits, ../nowhere]}\n")
    assert load_space("spaces/t.yaml").values["data"].args == (str(tmp_path / "spaces" / "imgs"), "digits",
                                                              str(tmp_path / "nowhere"))
    (tmp_path / "spaces" / "u.yaml").write_text("data: missing\n")
    code, err = run_main(capsys, "search", "--space", "spaces/u.yaml", "--results", tmp_path / "r")
    assert_one_line_error(code, err, f"data: {tmp_path / 'spaces' / 'missing'} is neither a folder")


def test_presize_above_the_images_is_warned_once(tmp_path):
    from tune_sota import preflight

    root = make_image_folder(tmp_path / "small", per_class=(6, 2), px=24)
    said = []
    preflight.check(parse_space(tiny(root, size=32, presize=40)), out=said.append)
    assert len(said) == 1 and "presize 40 px is above the source images' 24 px" in said[0], said
    said.clear()
    preflight.check(parse_space(tiny(root, size=16, presize=20)), out=said.append)
    assert said == []


def test_keep_checkpoints_old_counts_load_and_all_is_allowed():
    assert parse_space({"search": {"keep_checkpoints": 3}, "data": "digits"}).search.keep_checkpoints == 3
    assert parse_space({"search": {"keep_checkpoints": "all"}, "data": "digits"}).search.keep_checkpoints == "all"
    for bad in (0, "some", True):
        with pytest.raises(ConfigError, match="keep_checkpoints"):
            parse_space({"search": {"keep_checkpoints": bad}, "data": "digits"})


def test_a_winner_at_the_edge_of_its_range_is_flagged():
    from tune_sota.config import Config

    space = parse_space({"data": "digits", "lr": {"loguniform": [1e-3, 3e-2]}, "epochs": {"randint": [2, 5]},
                         "label_smoothing": {"uniform": [0.0, 0.2]}, "mixup": {"choice": [0.0, 0.4]}})
    notes = edge_notes(space, Config(lr=0.0279, epochs=5, label_smoothing=0.001, mixup=0.4))
    assert len(notes) == 2, notes  # label_smoothing cannot go below 0; a choice has no edge
    assert notes[0].startswith("lr=0.0279 is at the top") and "--set 'lr={loguniform: [0.001, 0.06]}'" in notes[0]
    assert notes[1].startswith("epochs=5 is at the top") and "randint: [2, 7]" in notes[1]
    assert edge_notes(space, Config(lr=0.005, epochs=3, label_smoothing=0.1)) == []


def test_load_model_says_what_it_needs(tmp_path):
    from tune_sota.config import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no state.pt"):
        load_model(tmp_path / "empty")
    (tmp_path / "best.yaml").write_text("data: digits\n")
    with pytest.raises(UserError, match="names no checkpoint; train it into a model"):
        load_model(tmp_path / "best.yaml")


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_in_seconds_and_resumes(tmp_path, slower_folder):
    """As SLURM's scancel, systemd and `timeout` do: SIGTERM to the whole group, the local Ray's daemons
    included. The search once hung 60 s on "Failed to connect to GCS", exited 1 and stayed `running`; and a
    SIGTERM among the writing after the trials (tables, best.yaml, the export) ended it with no resume line."""
    # 20 epochs of a fraction of a second: the first SIGTERM lands while both trials certainly train
    space = write_space(tmp_path / "group.yaml", {**tiny(slower_folder, epochs=20, size=32, presize=32),
                                                  "lr": {"loguniform": [1e-3, 1e-2]}},
                        {"num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1, "scheduler": "fifo",
                         "confirm_top": 0})
    results = tmp_path / "results"
    folder = results / "group"

    def stopped_by_sigterm(proc, when, what):
        _wait(when, 300, what, proc, every=0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 143, out[-3000:]
        assert time.monotonic() - t0 < 20, f"{time.monotonic() - t0:.0f} s from SIGTERM to exit"
        assert "Failed to connect to GCS" not in out and "Traceback" not in out, out[-3000:]
        assert yaml.safe_load((folder / "run.yaml").read_text())["status"] == "interrupted"
        resume_line = [line for line in out.splitlines() if "resume with:" in line]
        assert len(resume_line) == 1 and "--resume group" in resume_line[0], out[-3000:]
        return _resume_argv(resume_line[0])

    first = _popen("search", "--space", space, "--results", results)  # its own session: a group to signal
    argv = stopped_by_sigterm(first, lambda: any(r["epoch"] >= 1 for r in _results(folder)), "a trial's first epoch")
    assert set(load_trials(folder).status) == {"interrupted"}
    # resumed, then stopped again once the trials are done and the search writes its tables and export
    again = _popen(*argv)
    stopped_by_sigterm(again, lambda: (folder / "trials.csv").exists(), "the trial table")
    assert not (folder / "export").exists(), "an interrupted search has no export"
    resumed = cli(*argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert yaml.safe_load((folder / "run.yaml").read_text())["status"] == "finished"
    trials = load_trials(folder)
    assert len(trials) == 2 and set(trials.status) == {"completed"} and trials.lr.is_unique, trials
    assert (folder / "export" / "export.pkl").is_file() and not (folder / "export.partial").exists()
