"""Trial tables: one row per trial (`load_trials`) and one row per trial per epoch (`load_history`),
built from Ray's results and written next to the search's other outputs.

A results folder `results/NAME/` holds `space.yaml` (what was searched), `run.yaml` (command,
storage, versions), `trials.csv`, `history.csv` and `best.yaml`; with the default storage, Ray's own
experiment folder (trial folders, checkpoints) is the same folder.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import yaml

from tune_sota.config import Config, UserError

COMPLETED, STOPPED, ERROR, DIVERGED, UNFINISHED = "completed", "stopped", "error", "diverged", "unfinished"
STATUS_HELP = {
    COMPLETED: "trained every planned epoch",
    STOPPED: "stopped early by ASHA",
    ERROR: "raised an error (see the error column)",
    DIVERGED: "loss became NaN or infinite; stopped at once",
    UNFINISHED: "still running, or the search was interrupted",
}
HISTORY_COLUMNS = ["trial_id", "epoch", "epochs", "size", "accuracy", "valid_loss", "train_loss", "epoch_s",
                   "node", "start_epoch"]


def _status(metrics: dict, ray_error, finished: bool) -> str:
    if ray_error is not None or metrics.get("error"):
        return ERROR
    if metrics.get("diverged"):
        return DIVERGED
    if metrics.get("epoch", 0) >= metrics.get("epochs", math.inf):
        return COMPLETED
    return STOPPED if finished else UNFINISHED


def tables(grid, searched: list[str], *, finished: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) frames from a Ray `ResultGrid`; `finished` says the search ran to its end."""
    rows, history = [], []
    for result in grid:
        m = result.metrics or {}
        config = result.config or {}
        trial_id = m.get("trial_id") or Path(str(result.path)).name
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            frame = frame[frame.get("error", pd.Series("", index=frame.index)).fillna("") == ""]
            h = frame.reindex(columns=HISTORY_COLUMNS[1:]).assign(trial_id=trial_id)[HISTORY_COLUMNS]
            history.append(h)
        best = float(frame["accuracy"].max()) if frame is not None and len(frame) else math.nan
        error = m.get("error") or (str(result.error).splitlines()[0][:500] if result.error else "")
        rows.append({
            "trial_id": trial_id,
            "status": _status(m, result.error, finished),
            **{k: config.get(k) for k in searched},
            "epochs": config.get("epochs", m.get("epochs")),
            "epochs_run": int(m.get("epoch", 0) or 0),
            "accuracy": m.get("accuracy", math.nan),
            "best_accuracy": best,
            "valid_loss": m.get("valid_loss", math.nan),
            "train_loss": m.get("train_loss", math.nan),
            "time_s": round(float(m.get("time_total_s", math.nan)), 1),
            "tta_accuracy": math.nan,
            "error": error,
            "node": m.get("node", ""),
            "path": str(result.path),
        })
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values("accuracy", ascending=False, kind="stable").reset_index(drop=True)
    hist = pd.concat(history, ignore_index=True) if history else pd.DataFrame(columns=HISTORY_COLUMNS)
    return trials, hist


def _ray_grid(results_dir: Path):
    """Ray's results for a search that has not written its tables (running or interrupted)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    run = yaml.safe_load((results_dir / "run.yaml").read_text()) if (results_dir / "run.yaml").is_file() else {}
    experiment = run.get("experiment", str(results_dir))
    return ResultGrid(ExperimentAnalysis(experiment)), run.get("searched", [])


def _results_dir(results_dir) -> Path:
    p = Path(results_dir)
    if not p.is_dir():
        raise UserError(f"{p} is not a results folder; give one that `tune-sota search` wrote, e.g. results/quick")
    return p


# Read back as text whatever is text, so that a trial id like "00123456" or a schedule like "32" stays so.
TEXT_COLUMNS = {"trial_id", "status", "error", "node", "path"} | {
    f.name for f in dataclasses.fields(Config) if f.type == "str"}


def _read_csv(path: Path) -> pd.DataFrame:
    columns = pd.read_csv(path, nrows=0).columns
    frame = pd.read_csv(path, dtype={c: str for c in columns if c in TEXT_COLUMNS})
    return frame.fillna({c: "" for c in ("error", "node") if c in columns})


def load_trials(results_dir) -> pd.DataFrame:
    """One row per trial: id, status, searched parameters, epochs planned/run, accuracies, loss, time."""
    p = _results_dir(results_dir)
    if (p / "trials.csv").is_file():
        return _read_csv(p / "trials.csv")
    grid, searched = _ray_grid(p)
    return tables(grid, searched, finished=False)[0]


def load_history(results_dir) -> pd.DataFrame:
    """One row per trial per epoch: trial id, epoch, training size, accuracy and losses."""
    p = _results_dir(results_dir)
    if (p / "history.csv").is_file():
        return _read_csv(p / "history.csv")
    grid, searched = _ray_grid(p)
    return tables(grid, searched, finished=False)[1]
