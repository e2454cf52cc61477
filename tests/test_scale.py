"""A search that grows (issue 29): the report of a thousand trials stays small, paints quickly in a real
headless Chromium and stays legible (the best curves as lines, the rest as bands; the best rows in the
table, the whole in trials.csv), while a small search's report still draws every trial; and the scheduler's
state is written a decision at a time, not in full at each one.

The 1,000 trials are synthetic result tables (trials.csv, history.csv; a real Optuna study.db for the small
one, as a thousand trials take SQLite half a minute to store): the report is a renderer of a results folder,
so what it is tested on is a folder, not a search. bench/scale.py measures reports of real searches."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tests.test_report import assert_renders_offline, browse, rendered_charts
from tune_sota import report

SPACE = {"data": "digits", "arch": "xresnet18", "size": 32, "lr": {"loguniform": [1e-3, 3e-2]},
         "epochs": {"randint": [2, 5]}, "mixup": {"choice": [0.0, 0.2, 0.4]},
         "label_smoothing": {"uniform": [0.0, 0.2]}, "search": {"num_samples": 0}}


def synthetic_search(folder: Path, n: int, seed: int = 0, study: bool = True) -> Path:
    """A results folder of `n` made-up trials, laid out as `tune-sota search` writes one: ASHA-like statuses
    (most 2-epoch-plus trials stopped at half their schedule), one history row per epoch run, and the
    Optuna study with each trial's state and intermediate values."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows, hist, frozen = [], [], []
    for i in range(n):
        lr, epochs = float(np.exp(rng.uniform(np.log(1e-3), np.log(3e-2)))), int(rng.integers(2, 6))
        mixup, ls = float(rng.choice([0.0, 0.2, 0.4])), float(rng.uniform(0, 0.2))
        quality = 0.9 - 0.3 * abs(np.log10(lr) + 2) - 0.1 * mixup + rng.normal(0, 0.02)
        status = "completed" if i < 8 or rng.random() < 0.3 else ("error" if rng.random() < 0.02 else "stopped")
        run = epochs if status == "completed" else (0 if status == "error" else math.ceil(epochs / 2))
        curve = [quality * (1 - 0.5 ** (e + 1)) + rng.normal(0, 0.01) for e in range(run)]
        tid = f"{i:05d}"
        hist += [{"trial_id": tid, "epoch": e + 1, "epochs": epochs, "size": 32, "train_loss": 1 - a,
                  "valid_loss": 1.1 - a, "accuracy": a, "epoch_s": 2.0, "cpu_s": 2.0, "node": "", "start_epoch": 0}
                 for e, a in enumerate(curve)]
        rows.append({"trial_id": tid, "status": status, "lr": lr, "epochs": epochs, "mixup": mixup,
                     "label_smoothing": ls, "epochs_run": run, "accuracy": curve[-1] if curve else math.nan,
                     "best_accuracy": max(curve) if curve else math.nan, "valid_loss": 0.5, "train_loss": 0.4,
                     "time_s": 2.0 * run, "error": "ValueError: made up" if status == "error" else "", "node": "",
                     "n_valid": 180, "path": str(folder / f"trial_{tid}")})
        state = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}.get(status, TrialState.FAIL)
        frozen.append(create_trial(
            state=state, value=curve[-1] if state == TrialState.COMPLETE else None,
            params={"lr": lr, "epochs": epochs, "mixup": mixup, "label_smoothing": ls},
            distributions={"lr": FloatDistribution(1e-3, 3e-2, log=True), "epochs": IntDistribution(2, 5),
                           "mixup": CategoricalDistribution([0.0, 0.2, 0.4]),
                           "label_smoothing": FloatDistribution(0.0, 0.2)},
            user_attrs={"ray_trial_id": tid}, intermediate_values={e + 1: a for e, a in enumerate(curve)}))
    trials = pd.DataFrame(rows).sort_values("accuracy", ascending=False, kind="stable")
    trials.to_csv(folder / "trials.csv", index=False)
    pd.DataFrame(hist).to_csv(folder / "history.csv", index=False)
    best = trials.iloc[0]
    name = folder.name
    (folder / "run.yaml").write_text(yaml.safe_dump({"command": "tune-sota search (synthetic)", "name": name,
                                                     "space": name, "status": "finished",
                                                     "searched": ["lr", "epochs", "mixup", "label_smoothing"]}))
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (folder / "best.yaml").write_text(yaml.safe_dump({
        "lr": float(best.lr), "epochs": int(best.epochs), "mixup": float(best.mixup),
        "label_smoothing": float(best.label_smoothing),
        "result": {"search": name, "trial_id": best.trial_id, "select_on": "holdout", "accuracy": float(best.accuracy),
                   "tta_accuracy": None, "note": "not confirmed (confirm_top 0)"}}))
    if study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}", direction="maximize")
        s.add_trials(frozen)
    return folder


PAINT_PROBE = """<script>window.addEventListener('load', function () {
  document.body.setAttribute('data-load-ms', String(performance.now()));
});</script>"""


def test_a_thousand_trials_report_is_small_legible_and_paints_quickly(tmp_path):
    folder = synthetic_search(tmp_path / "big", 1000, study=False)
    page = report.write(folder)
    text = page.read_text()
    assert page.stat().st_size <= 10 * 2**20, f"report.html is {page.stat().st_size / 2**20:.1f} MB"
    s = report.load(folder)
    curves = report.fig_curves(s)
    lines = [t for t in curves.data if t.mode == "lines+markers"]
    assert len(lines) == report.CURVE_LINES, "the best trials as lines, not a thousand"
    assert len(curves.data) <= report.CURVE_LINES + 3 * 3, "the others as a band (and its median) per status"
    best = set(s.trials.trial_id.head(report.CURVE_LINES))
    assert {re.match(r"(\d+)", t.hovertemplate).group(1) for t in lines} == best
    assert any(t.fill == "tonexty" for t in curves.data)
    parallel = report.fig_parallel(s).data[0]
    assert parallel.line.cmin is not None and parallel.line.cmin > s.trials.accuracy.quantile(0.85), "the best share"
    rows = re.search(r"<table class='trials'>.*?</table>", text, re.S).group(0).count("<tr>") - 1
    assert rows == report.TABLE_ROWS and "every one is in trials.csv" in text
    assert len(pd.read_csv(folder / "trials.csv")) == 1000, "the whole table stays in the CSV"

    # the page in a real headless Chromium: every chart drawn, and by when
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PAINT_PROBE + "</body>"))
    t0 = time.monotonic()
    run = browse(probe, tmp_path / "profile", "--dump-dom")
    wall = time.monotonic() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    counts = rendered_charts(run.stdout)
    assert set(counts) == {"best_so_far", "curves", "parallel", "cost"} and all(counts.values()), counts
    load_s = float(re.search(r'data-load-ms="([\d.]+)"', run.stdout).group(1)) / 1000
    assert load_s <= 10, f"the charts took {load_s:.1f} s to draw (browser run {wall:.1f} s)"


def test_a_small_search_report_still_draws_every_trial(tmp_path):
    folder = synthetic_search(tmp_path / "small", 12)
    report.write(folder)
    s = report.load(folder)
    curves = report.fig_curves(s)
    assert len(curves.data) == 12 and all(t.mode == "lines+markers" for t in curves.data), "a line per trial"
    text = (folder / "report.html").read_text()
    assert all(tid in text for tid in s.trials.trial_id) and "best accuracy first" in text
    assert report.fig_parallel(s).data[0].line.cmin is None, "every line coloured by accuracy"
    assert_renders_offline(folder, tmp_path)  # every chart drawn in headless Chromium (skips without one)


def test_scheduler_state_is_written_a_decision_at_a_time(tmp_path):
    from tune_sota import scheduler
    from tune_sota.scheduler import ScheduleASHA

    state = tmp_path / "scheduler.json"
    asha = ScheduleASHA(shares=[0.5], reduction_factor=2, state_file=str(state), metric="accuracy", mode="max")
    t0, full_writes, last = time.monotonic(), 0, None
    for i in range(300):
        asha.decide(f"t{i}", 2, 4, 0.5 + (i % 17) / 100, group="flat_cos" if i % 3 == 0 else "one_cycle")
        st = state.stat()
        if (st.st_ino, st.st_mtime_ns, st.st_size) != last:
            full_writes, last = full_writes + 1, (st.st_ino, st.st_mtime_ns, st.st_size)
    allowed = 1 + (time.monotonic() - t0) / scheduler.SNAPSHOT_EVERY_S
    assert full_writes <= allowed, f"the whole state was written {full_writes} times in 300 decisions"
    assert len(scheduler.journal_of(state).read_text().splitlines()) >= 300 - full_writes
    # a resumed search (the driver killed: no compaction) reads every decision back from file and journal
    again = ScheduleASHA(shares=[0.5], reduction_factor=2, state_file=str(state), metric="accuracy", mode="max")
    assert again.records == asha.records and again.groups == asha.groups and len(again.records[0.5]) == 300
    with open(scheduler.journal_of(state), "a") as journal:
        journal.write('[0.5, "cut')  # a driver killed mid-line
    scheduler.compact(state)  # the end of a search: the file in full, no journal
    assert not scheduler.journal_of(state).exists()
    saved = json.loads(state.read_text())
    assert saved[repr(0.5)] == asha.records[0.5] and saved["groups"] == asha.groups


def test_progress_of_a_large_search_is_a_line_per_trial_end_and_new_best():
    from ray.tune.experiment import Trial

    from tune_sota.progress import QUIET_AFTER, Progress

    def lines(num_samples: int) -> list[str]:
        said = []
        p = Progress(["lr"], num_samples, said.append)
        for i, accuracy in enumerate([0.5, 0.7, 0.6, 0.85, 0.4]):
            trial = Trial("scale", stub=True, config={"lr": 0.01}, trial_id=f"t{i}")
            p.on_trial_start(0, [], trial)
            for epoch in (1, 2):
                result = {"epoch": epoch, "epochs": 2, "size": 8, "accuracy": accuracy - 0.1 * (2 - epoch),
                          "valid_loss": 1.0}
                p.on_trial_result(0, [], trial, result)
                trial.update_last_result(result)
            p.on_trial_complete(0, [], trial)
        return said

    small, large = lines(QUIET_AFTER), lines(QUIET_AFTER + 1)
    assert len(small) == 5 * 4, "a small search: start, two epochs and the end of every trial"
    ends = [line for line in large if line.startswith("  [")]
    assert len(ends) == 5 and all("best" in line and "elapsed" in line for line in ends)
    news = [line for line in large if line.startswith("  epoch")]
    assert len(news) == 6 and all(line.endswith("(new best)") for line in news), news  # .4 .5 .6 .7 .75 .85
    assert not any(line.startswith("  start") for line in large)


def test_the_study_commits_without_waiting_for_the_disk(tmp_path):
    import sqlite3

    from tune_sota.config import Dist
    from tune_sota.searcher import StudySearcher

    s = StudySearcher({"lr": Dist("loguniform", (1e-3, 1e-1))}, storage=f"sqlite:///{tmp_path / 'study.db'}",
                      study_name="wal", metric="accuracy", mode="max")
    s.suggest("a")
    s.on_trial_complete("a", {"accuracy": 0.5, "epoch": 2, "epochs": 2})
    with sqlite3.connect(tmp_path / "study.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    loaded = optuna.load_study(study_name="wal", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state for t in loaded.trials] == [TrialState.COMPLETE], "readers see every commit"
