"""scale: what a search's own cost does as the trial count grows (issue 29). Searches of the smallest
real trial the product runs (digits at 8 px, xresnet18 at the narrowest width, 1-2 epochs, ASHA and TPE
on, two trials at once) at 30, 100, 300 and 1,000 trials, each measured in its own driver process:

- wall time of the trials (Tuner.fit) against the minimal time, the trials' own seconds / concurrency;
- the driver's CPU seconds per trial, split by component (searcher suggest and tell, scheduler and its
  state file, progress lines, Ray's result loggers and experiment-state saves, the rest of Ray's loop);
- the driver's peak memory, study.db, the results folder;
- the end-of-search steps apart: tables, report, export (no confirmation: confirm_top 0);
- `tune-sota trials` (a fresh process) and `load_trials` on the finished search;
- report.html's size and the time until its charts are drawn in headless Chromium.

    python bench/scale.py --sizes 30 100     # each size one recorded row
    python bench/scale.py --resume-at 300    # a resumed search of 300 trials

Resumable in chunks: each size's row is kept in bench/scale.json, and a rerun measures only the sizes it
lacks (--redo measures again). Every run appends the table of all rows to bench/RESULTS.md and redraws
bench/scale.png. Component times are the driver main thread's CPU inside each component (time.thread_time
around the real methods, so nothing is replaced); `ray loop` is the rest of the main thread's CPU in
Tuner.fit, `ray threads` the driver's CPU outside its main thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, ROOT, machine, record, table

ROWS = BENCH / "scale.json"
PLOT = BENCH / "scale.png"
CONCURRENCY = 2
COMPONENTS = ("suggest", "tell", "scheduler", "scheduler_save", "progress", "ray_loggers", "experiment_state")
END_STEPS = ("tables", "study_close", "writes", "export", "report", "prune")


def space_values(n: int) -> dict:
    """The smallest real trial the product runs, searched over three values (ASHA has 2-epoch trials to stop)."""
    return {"data": "digits", "arch": "xresnet18", "width": 0.0625, "size": 8, "presize": 10, "flip": False,
            "batch_size": 64, "lr": {"loguniform": [1e-3, 3e-2]}, "epochs": {"randint": [1, 2]},
            "label_smoothing": {"uniform": [0.0, 0.2]},
            "search": {"num_samples": n, "max_concurrent": CONCURRENCY, "cpus_per_trial": 1, "grace": 0.5,
                       "reduction_factor": 2, "startup_trials": 4, "holdout": 0.1, "confirm_top": 0}}


# ---- timers around the real methods (the driver process only) ------------------------------------------


CPU: dict[str, float] = {}
WALL: dict[str, float] = {}
CALLS: dict[str, int] = {}


def timed(owner, attr: str, bucket: str, wall: bool = False) -> None:
    """Wrap `owner.attr` so that its main-thread CPU (and wall, for end steps) adds to `bucket`."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        c, w = time.thread_time(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            CPU[bucket] = CPU.get(bucket, 0.0) + time.thread_time() - c
            CALLS[bucket] = CALLS.get(bucket, 0) + 1
            if wall:
                WALL[bucket] = WALL.get(bucket, 0.0) + time.perf_counter() - w

    setattr(owner, attr, wrapper)


def install_timers() -> dict:
    """Put the timers in place; returns the dict Tuner.fit's own figures land in."""
    from ray import tune
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.logger.logger import LoggerCallback

    from tune_sota import progress, scheduler, search, searcher

    timed(searcher.StudySearcher, "suggest", "suggest")
    timed(searcher.StudySearcher, "on_trial_result", "tell")
    timed(searcher.StudySearcher, "on_trial_complete", "tell")
    timed(scheduler.ScheduleASHA, "on_trial_result", "scheduler")
    if hasattr(scheduler.ScheduleASHA, "_save"):
        timed(scheduler.ScheduleASHA, "_save", "scheduler_save")
    for m in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_step_begin"):
        timed(progress.Progress, m, "progress")
    for m in ("on_trial_result", "on_trial_complete", "on_trial_start"):
        timed(LoggerCallback, m, "ray_loggers")
    timed(TuneController, "checkpoint", "experiment_state")
    timed(search.results, "tables", "tables", wall=True)
    timed(search, "_study", "study_close", wall=True)
    timed(search, "_close_study", "study_close", wall=True)
    timed(search, "write_atomic", "writes", wall=True)
    timed(search, "_export_quietly", "export", wall=True)
    timed(search, "write_quietly", "report", wall=True)
    timed(search, "_prune_checkpoints", "prune", wall=True)

    fit_figures: dict = {}
    fit = tune.Tuner.fit

    @functools.wraps(fit)
    def fit_wrapper(self, *a, **k):
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
        before = dict(CPU)
        try:
            return fit(self, *a, **k)
        finally:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            fit_figures.update(wall_s=time.perf_counter() - w0, main_cpu_s=time.thread_time() - c0,
                               process_cpu_s=(r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                               components={b: CPU.get(b, 0.0) - before.get(b, 0.0) for b in COMPONENTS})

    tune.Tuner.fit = fit_wrapper
    return fit_figures


# ---- the report in a browser ---------------------------------------------------------------------------


PAINT_PROBE = """<script>window.addEventListener('load', function () {
  var fcp = performance.getEntriesByName('first-contentful-paint')[0];
  document.body.setAttribute('data-paint', JSON.stringify({load_ms: performance.now(),
    fcp_ms: fcp ? fcp.startTime : null, svgs: document.querySelectorAll('svg.main-svg').length}));
});</script>"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def paint(page: Path, work: Path) -> dict:
    """Open a copy of `page` (a probe script added) in headless Chromium: the in-page time of the load event
    (every inline chart drawn by then: plotly draws inside its script), the first contentful paint, and the
    wall time of the whole browser run."""
    browser = chromium()
    if browser is None:
        return {}
    probe = work / "paint.html"
    probe.write_text(page.read_text().replace("</body>", PAINT_PROBE + "</body>"))
    t0 = time.perf_counter()
    run = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-extensions", f"--user-data-dir={work / 'profile'}",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,1800", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    m = re.search(r'data-paint="([^"]+)"', run.stdout)
    got = json.loads(m.group(1).replace("&quot;", '"')) if m else {}
    return {"load_s": (got.get("load_ms") or float("nan")) / 1000, "fcp_s": (got.get("fcp_ms") or float("nan")) / 1000,
            "svgs": got.get("svgs"), "browser_wall_s": wall}


# ---- one size, in its own process ----------------------------------------------------------------------


def measure(n: int, work: Path) -> dict:
    """Run a search of `n` trials in this process and return its row."""
    import warnings

    warnings.filterwarnings("ignore")
    fit = live_fit = install_timers()
    from tune_sota import load_trials, model, runstate, search
    from tune_sota.config import parse_space

    space = parse_space(space_values(n), name=f"scale{n}")
    # What a terminal would show, through the logger the CLI shows (search.say: Tune pickles the callbacks
    # that hold `out`, so it must be a module function).
    import logging

    lines = logging.FileHandler(work / "progress.log")
    logging.getLogger("tune_sota.progress").addHandler(lines)
    logging.getLogger("tune_sota.progress").setLevel(logging.INFO)
    logging.getLogger("tune_sota.progress").propagate = False
    out = search.say

    t0 = time.perf_counter()
    outcome = search.run(space, name=f"scale{n}", results_root=work / "results", command=f"bench/scale.py {n}",
                         out=out)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    folder = outcome.results_dir
    trials = outcome.trials
    t = time.perf_counter()
    load_trials(folder)
    load_s = time.perf_counter() - t
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "tune_sota.cli", "trials", str(folder)], env=env,
                         capture_output=True, text=True)
    cli_s = time.perf_counter() - t
    assert cli.returncode == 0, cli.stderr[-2000:]
    page = folder / "report.html"
    painted = paint(page, work) if page.is_file() else {}
    fit, calls, end_s = dict(fit), dict(CALLS), {k: WALL.get(k, 0.0) for k in END_STEPS}  # before the resume adds
    resumed = resume_finished(space, folder, live_fit, out)
    trial_s = float(trials.time_s.fillna(0).sum())
    counts = trials.status.value_counts().to_dict()
    return {
        "trials": n, "statuses": counts, "wall_s": wall, "fit_wall_s": fit["wall_s"],
        "minimal_s": trial_s / CONCURRENCY, "trial_s": trial_s,
        "driver_cpu_s": fit["process_cpu_s"], "driver_main_cpu_s": fit["main_cpu_s"],
        "components": fit["components"], "calls": calls, "end_s": end_s,
        "peak_mb": peak_mb, "study_db_bytes": sum(p.stat().st_size for p in folder.glob("study.db*")),  # with its -wal
        "results_bytes": model.disk_usage(folder),
        "scheduler_json_bytes": _size(Path(runstate.state_file(folder, "scheduler.json"))),
        "progress_lines": sum(1 for _ in open(work / "progress.log")), "load_trials_s": load_s, "trials_cli_s": cli_s,
        "report_bytes": page.stat().st_size if page.is_file() else None,
        "paint": painted, "resume": resumed,
        "machine": machine(),
    }


def resume_finished(space, folder: Path, fit: dict, out) -> dict:
    """Resume the finished search as if it had been interrupted after its last trial: what resuming costs at
    this many trials (Ray's experiment, the study and ASHA's records read back), with nothing left to run;
    and whether every trial is still there once, none added, none run again."""
    import optuna

    from tune_sota import load_trials, runstate, search

    before = load_trials(folder)
    runstate.mark(folder, runstate.INTERRUPTED)
    fit.clear()
    t = time.perf_counter()
    try:
        again = search.run(space, name=folder.name, results_root=folder.parent, resume=True, out=out,
                           command="bench/scale.py (resumed)")
    except Exception as e:  # noqa: BLE001  (the row keeps its other figures)
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    total = time.perf_counter() - t
    after = again.trials
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}")
    return {"total_s": total, "fit_s": fit.get("wall_s"), "trials_before": len(before), "trials_after": len(after),
            "same_trials": sorted(before.trial_id) == sorted(after.trial_id) and after.trial_id.is_unique,
            "same_results": bool((before.set_index("trial_id").accuracy.sort_index().round(6)
                                  == after.set_index("trial_id").accuracy.sort_index().round(6)).all()),
            "study_trials": len(study.trials)}


def _size(p: Path) -> int | None:
    return p.stat().st_size if p.is_file() else None


# ---- a resumed search ----------------------------------------------------------------------------------


def measure_resume(n: int, work: Path) -> dict:
    """A search of `n` trials stopped by Ctrl-C (SIGINT) ten trials before its end, then resumed through the
    CLI: the resumed driver's time to its first new trial and to its end, and whether any trial was lost or
    run twice (the study, Ray's trials and trials.csv agree, n trials, no configuration twice)."""
    import yaml

    spec = work / f"scale{n}.yaml"
    spec.write_text(yaml.safe_dump(space_values(n), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "tune_sota.cli", "search", "--space", str(spec), "--results", str(work / "results"),
            "--name", f"resume{n}"]
    first = subprocess.Popen(base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done, stopped_at = 0, None
    for line in first.stdout:
        m = re.match(r"\s+\[(\d+)/\d+\]", line)
        if m:
            done = int(m.group(1))
            if stopped_at is None and done >= n - 10:
                stopped_at = done
                first.send_signal(signal.SIGINT)
    first.wait()
    t0 = time.perf_counter()
    second = subprocess.Popen([sys.executable, "-m", "tune_sota.cli", "search", "--space", str(spec), "--results",
                               str(work / "results"), "--resume", f"resume{n}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    first_start = first_done = None
    out = []
    for line in second.stdout:
        out.append(line)
        now = time.perf_counter() - t0
        if first_start is None and line.startswith("  start  "):
            first_start = now
        if first_done is None and re.match(r"\s+\[\d+/\d+\]", line):
            first_done = now
    second.wait()
    total = time.perf_counter() - t0
    assert second.returncode == 0, "".join(out[-40:])
    import optuna

    from tune_sota import load_trials

    folder = work / "results" / f"resume{n}"
    trials = load_trials(folder)
    study = optuna.load_study(study_name=f"resume{n}", storage=f"sqlite:///{folder / 'study.db'}")
    ray_ids = [t.user_attrs.get("ray_trial_id") for t in study.trials]
    params = {tuple(sorted(t.params.items())) for t in study.trials}
    return {"trials": n, "stopped_after": stopped_at, "first_exit": first.returncode, "first_start_s": first_start,
            "first_trial_done_s": first_done, "resume_total_s": total, "rows": len(trials),
            "unique_ids": trials.trial_id.nunique(), "study_trials": len(study.trials),
            "study_matches": sorted(ray_ids) == sorted(trials.trial_id), "distinct_configs": len(params),
            "machine": machine()}


# ---- the study's storage alone: SQLite against Optuna's journal file ----------------------------------


def measure_study(n: int, work: Path) -> dict:
    """The product's searcher (StudySearcher: TPE, ask/tell, one intermediate value per epoch) driven without
    Ray through `n` trials, on SQLite (the default study.db) and on Optuna's JournalStorage in a local file:
    milliseconds of suggest and of tell per trial, by block of trials, and the storage's size."""
    import numpy as np
    import optuna

    from tune_sota.config import Dist
    from tune_sota.searcher import StudySearcher

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"lr": Dist("loguniform", (1e-3, 3e-2)), "epochs": Dist("randint", (1, 2)),
             "label_smoothing": Dist("uniform", (0.0, 0.2))}
    rng = np.random.default_rng(0)
    block = max(1, n // 10)
    out = {}
    for kind in ("sqlite", "journal"):
        path = work / ("study.db" if kind == "sqlite" else "study.log")
        storage = (f"sqlite:///{path}" if kind == "sqlite" else
                   optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))))
        s = StudySearcher(space, storage=storage, study_name="study", metric="accuracy", mode="max", seed=0,
                          startup_trials=4)
        suggest, tell = [], []
        for i in range(n):
            t = time.perf_counter()
            config = s.suggest(f"t{i}")
            suggest.append(time.perf_counter() - t)
            t = time.perf_counter()
            acc = float(0.9 - abs(np.log10(config["lr"]) + 2) * 0.3 + rng.normal(0, 0.02))
            s.on_trial_result(f"t{i}", {"accuracy": acc - 0.05, "epoch": 1, "epochs": config["epochs"]})
            last = {"accuracy": acc, "epoch": config["epochs"], "epochs": config["epochs"]}
            s.on_trial_complete(f"t{i}", last if rng.random() < 0.6 else {**last, "epoch": 1})
            tell.append(time.perf_counter() - t)
        out[kind] = {"suggest_ms": [1000 * float(np.mean(suggest[b:b + block])) for b in range(0, n, block)],
                     "tell_ms": [1000 * float(np.mean(tell[b:b + block])) for b in range(0, n, block)],
                     "block": block, "bytes": path.stat().st_size}
    return {"trials": n, **out, "machine": machine()}


# ---- the parent: rows, RESULTS.md, the plot ------------------------------------------------------------


def load_rows() -> dict:
    return json.loads(ROWS.read_text()) if ROWS.is_file() else {}


def child(kind: str, n: int) -> dict:
    """Measure one size in a fresh process (its own driver, its own peak memory)."""
    work = Path(tempfile.mkdtemp(prefix=f"tune_sota_scale{n}_"))
    env = {**os.environ, "TUNE_SOTA_CACHE": str(Path(tempfile.gettempdir()) / "tune_sota_scale_cache"),
           "PYTHONPATH": str(ROOT)}
    run = None
    try:
        run = subprocess.run([sys.executable, __file__, f"--{kind}-one", str(n), "--work", str(work)], env=env)
        if run.returncode:
            sys.exit(f"scale: the {n}-trial {kind} run failed (exit {run.returncode}); its files are in {work}")
        return json.loads((work / "row.json").read_text())
    finally:
        if run is not None and run.returncode == 0:
            shutil.rmtree(work, ignore_errors=True)


def per_trial(row: dict, key: str) -> float:
    return row["components"].get(key, 0.0) / row["trials"]


def render(rows: dict) -> str:
    sizes = sorted((r for k, r in rows.items() if k.isdigit()), key=lambda r: r["trials"])
    out = []
    if sizes:
        head = ["trials", "wall s", "minimal s", "overhead", "driver CPU s/trial", "suggest", "tell", "scheduler",
                "(its saves)", "progress", "ray loggers", "exp. state", "ray loop", "ray threads", "peak MB",
                "study.db MB", "results MB"]
        body = []
        for r in sizes:
            c, n = r["components"], r["trials"]
            ours = sum(c.get(k, 0.0) for k in COMPONENTS if k != "scheduler_save")
            body.append([n, r["fit_wall_s"], r["minimal_s"], f"{r['fit_wall_s'] / r['minimal_s'] - 1:+.0%}",
                         f"{r['driver_cpu_s'] / n:.3f}",
                         *(f"{per_trial(r, k) * 1000:.1f}" for k in COMPONENTS),
                         f"{(r['driver_main_cpu_s'] - ours) / n * 1000:.1f}",
                         f"{(r['driver_cpu_s'] - r['driver_main_cpu_s']) / n * 1000:.1f}",
                         r["peak_mb"], f"{r['study_db_bytes'] / 2**20:.2f}", f"{r['results_bytes'] / 2**20:.1f}"])
        out.append(table(head, body))
        out.append("\nComponent columns (suggest ... ray threads) are driver CPU milliseconds per trial; `overhead` "
                   "is the trials' wall (Tuner.fit) over the minimal time, the trials' own seconds / 2.\n")
        head2 = ["trials", "statuses", "tables s", "report s", "export s", "prune s", "study close s",
                 "trials.csv etc. s", "load_trials s", "`tune-sota trials` s", "report MB", "charts drawn s",
                 "first paint s", "browser run s", "progress lines"]
        body2 = []
        for r in sizes:
            e, p = r["end_s"], r.get("paint") or {}
            body2.append([r["trials"], ", ".join(f"{v} {k}" for k, v in sorted(r["statuses"].items())),
                          f"{e['tables']:.2f}", f"{e['report']:.2f}", f"{e['export']:.2f}", f"{e['prune']:.2f}",
                          f"{e['study_close']:.2f}", f"{e['writes']:.2f}", f"{r['load_trials_s']:.3f}",
                          f"{r['trials_cli_s']:.2f}", f"{(r['report_bytes'] or 0) / 2**20:.2f}",
                          f"{p.get('load_s', float('nan')):.2f}", f"{p.get('fcp_s', float('nan')):.2f}",
                          f"{p.get('browser_wall_s', float('nan')):.2f}", r["progress_lines"]])
        out.append(table(head2, body2))
        head3 = ["trials", "resume: restore to end of trials s", "resume: whole command s", "trials before/after",
                 "same trials, same results", "study trials"]
        body3 = []
        for r in sizes:
            z = r.get("resume") or {}
            if "total_s" in z:
                body3.append([r["trials"], f"{z['fit_s']:.2f}", f"{z['total_s']:.1f}",
                              f"{z['trials_before']}/{z['trials_after']}", z["same_trials"] and z["same_results"],
                              z["study_trials"]])
            elif z:
                body3.append([r["trials"], z.get("error", "?"), "", "", "", ""])
        if body3:
            out.append("\nResuming the finished search as if interrupted after its last trial (run.yaml marked "
                       "interrupted, then `search.run(resume=True)` in the same driver): what reading back Ray's "
                       "experiment, the study and ASHA's records costs at this size; the whole command repeats the "
                       "end steps (tables, export, report).\n")
            out.append(table(head3, body3))
        out.append("\n`charts drawn s`: navigation to the load event in headless Chromium (plotly draws each chart "
                   "inside its inline script, so every chart is drawn by then); `browser run s`: the whole "
                   "`chromium --headless --dump-dom`, start-up included.\n")
    resumes = sorted((r for k, r in rows.items() if k.startswith("resume")), key=lambda r: r["trials"])
    if resumes:
        out.append(table(["trials", "stopped after", "resume: first new trial starts s", "first trial ends s",
                          "resume to end s", "rows", "distinct ids", "study trials", "study = table",
                          "distinct configs"],
                         [[r["trials"], r["stopped_after"], f"{r['first_start_s']:.1f}",
                           f"{r['first_trial_done_s']:.1f}", f"{r['resume_total_s']:.1f}", r["rows"],
                           r["unique_ids"], r["study_trials"], r["study_matches"], r["distinct_configs"]]
                          for r in resumes]))
    for r in sorted((r for k, r in rows.items() if k.startswith("study")), key=lambda r: r["trials"]):
        b = r["sqlite"]["block"]
        out.append(f"\nThe searcher alone (StudySearcher, TPE, no Ray), {r['trials']} trials one after another: "
                   f"milliseconds per trial, mean over each block of {b} trials; storage size at the end "
                   f"(SQLite {r['sqlite']['bytes'] / 2**20:.2f} MB, journal {r['journal']['bytes'] / 2**20:.2f} MB).\n")
        out.append(table(["trials", *(f"{i * b + 1}-{(i + 1) * b}" for i in range(len(r["sqlite"]["suggest_ms"])))],
                         [[f"{kind}: {what}", *(f"{v:.1f}" for v in r[kind][f"{what}_ms"])]
                          for kind in ("sqlite", "journal") for what in ("suggest", "tell")]))
    return "\n".join(out)


def plot(rows: dict) -> None:
    """Each cost against the trial count, per trial where it is a per-trial cost (flat is the goal)."""
    from matplotlib.figure import Figure

    sizes = sorted((r for k, r in rows.items() if k.isdigit()), key=lambda r: r["trials"])
    if not sizes:
        return
    n = [r["trials"] for r in sizes]
    fig = Figure(figsize=(13, 8), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3)
    ax = axes[0, 0]
    ax.plot(n, [r["fit_wall_s"] / r["minimal_s"] - 1 for r in sizes], "o-")
    ax.axhline(0.2, color="r", ls=":", label="goal: 20%")
    ax.set(title="overhead over the minimal time", ylabel="wall / minimal - 1")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(n, [r["driver_cpu_s"] / r["trials"] for r in sizes], "o-", lw=2, label="driver total")
    for k in COMPONENTS:
        ax.plot(n, [per_trial(r, k) for r in sizes], ".-", label=k)
    ours = [sum(r["components"].get(k, 0.0) for k in COMPONENTS if k != "scheduler_save") for r in sizes]
    ax.plot(n, [(r["driver_main_cpu_s"] - o) / r["trials"] for r, o in zip(sizes, ours)], "s--", label="ray loop")
    ax.plot(n, [(r["driver_cpu_s"] - r["driver_main_cpu_s"]) / r["trials"] for r in sizes], "^--",
            label="ray threads")
    ax.set(title="driver CPU s per trial", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    ax.plot(n, [r["peak_mb"] for r in sizes], "o-", label="driver peak MB")
    ax.plot(n, [r["study_db_bytes"] / 2**20 for r in sizes], "o-", label="study.db MB")
    ax.plot(n, [r["results_bytes"] / 2**20 for r in sizes], "o-", label="results folder MB")
    ax.plot(n, [(r["report_bytes"] or 0) / 2**20 for r in sizes], "o-", label="report.html MB")
    ax.set(title="memory and disk", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for k in END_STEPS:
        ax.plot(n, [r["end_s"][k] for r in sizes], "o-", label=k)
    ax.set(title="end-of-search steps, s")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot(n, [r["trials_cli_s"] for r in sizes], "o-", label="tune-sota trials")
    ax.plot(n, [r["load_trials_s"] for r in sizes], "o-", label="load_trials")
    ax.plot(n, [(r.get("paint") or {}).get("load_s", float("nan")) for r in sizes], "o-",
            label="report: charts drawn in Chromium")
    ax.plot(n, [(r.get("resume") or {}).get("fit_s", float("nan")) for r in sizes], "o-",
            label="resume: restore to end of trials")
    ax.axhline(5, color="r", ls=":", lw=0.8)
    ax.axhline(10, color="r", ls=":", lw=0.8)
    ax.set(title="reading a finished search, s")
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    ax.plot(n, [r["progress_lines"] / r["trials"] for r in sizes], "o-", label="progress lines per trial")
    ax.set(title="progress output")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set(xscale="log", xlabel="trials")
        ax.grid(alpha=0.3)
    fig.suptitle("bench/scale.py: a search's own cost against its trial count (2 trials at once)")
    fig.savefig(PLOT)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[30, 100, 300, 1000], help="trial counts to measure")
    p.add_argument("--resume-at", type=int, nargs="*", default=[], help="trial counts of resumed searches to measure")
    p.add_argument("--redo", action="store_true", help="measure again the sizes already in bench/scale.json")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--search-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--study", type=int, nargs="*", default=[],
                   help="trial counts of the searcher alone, SQLite against Optuna's journal file (no Ray)")
    p.add_argument("--resume-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--study-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.search_one or args.resume_one or args.study_one:
        work = Path(args.work)
        row = (measure(args.search_one, work) if args.search_one else measure_resume(args.resume_one, work)
               if args.resume_one else measure_study(args.study_one, work))
        (work / "row.json").write_text(json.dumps(row, indent=1, default=str))
        return
    rows, measured = load_rows(), []
    todo = ([("search", n, str(n)) for n in args.sizes] + [("resume", n, f"resume{n}") for n in args.resume_at]
            + [("study", n, f"study{n}") for n in args.study])
    for kind, n, key in todo:
        if key in rows and not args.redo:
            print(f"scale: {key} is recorded; skipped (--redo measures it again)", flush=True)
            continue
        print(f"scale: measuring {kind} at {n} trials", flush=True)
        rows[key] = {**child(kind, n), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        ROWS.write_text(json.dumps(rows, indent=1, sort_keys=True))  # each size is kept as soon as it is measured
        measured.append(key)
        print(render({key: rows[key]}), flush=True)
    plot(rows)
    text = render(rows)
    print(text)
    if measured and not args.no_record:
        note = (f"\n\nMeasured now: {', '.join(measured)}; the other rows are from bench/scale.json (dated there). "
                "Run one heavy job at a time (the machine otherwise lightly used). Trial: digits at 8 px, "
                "xresnet18 width 0.0625, 1-2 epochs, lr, epochs and label smoothing searched by TPE (4 random first), "
                "ASHA (grace 0.5, rf 2), 2 trials of 1 CPU at once, a 10% holdout, no confirmation. Plot: "
                "bench/scale.png.")
        record("scale: a search's own cost against its trial count (issue 29)", text + note)


if __name__ == "__main__":
    main()
