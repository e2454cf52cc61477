"""Trial tables: one row per trial (`load_trials`) and one row per trial per epoch (`load_history`),
built from Ray's results and written next to the search's other outputs.

A results folder `results/NAME/` holds `space.yaml` (what was searched), `run.yaml` (command,
storage, versions), `trials.csv`, `history.csv` and `best.yaml`; with the default storage, Ray's own
experiment folder (trial folders, checkpoints) is the same folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from tune_sota.config import Config, UserError


@dataclass
class EpochReport:
    """What one finished epoch measured: a row of `history.csv` and what a trial reports to Tune.
    `accuracy` is always at the final size, on the holdout during a search."""

    epoch: int  # epochs done, 1-based
    epochs: int  # epochs planned
    size: int  # training image size of this epoch
    train_loss: float
    valid_loss: float
    accuracy: float
    epoch_s: float
    diverged: bool = False
    # CPU seconds of the training process in this epoch (all its threads): on a shared machine wall
    # seconds measure the neighbours too; bench/record_curves.py records both.
    cpu_s: float = math.nan
    frozen: bool = False  # fine-tuning's first phase: the head alone trains (rungs wait for the unfreeze)

    def row(self, **extra) -> dict:
        """The report as a flat metrics dict, with `extra` columns (error, node, start_epoch...)."""
        return {**dataclasses.asdict(self), **extra}


COMPLETED, STOPPED, ERROR, DIVERGED, UNFINISHED = "completed", "stopped", "error", "diverged", "unfinished"
INTERRUPTED = "interrupted"
OUT_OF_TIME, NOT_STARTED = "out_of_time", "not_started"  # the time budget's (budget.py)
STATUS_HELP = {
    COMPLETED: "trained every planned epoch",
    STOPPED: "stopped early by ASHA",
    ERROR: "raised an error (see the error column)",
    DIVERGED: "loss became NaN or infinite; stopped at the end of that epoch",
    UNFINISHED: "still running (or its driver was killed)",
    INTERRUPTED: "cut off by Ctrl-C or SIGTERM; continues from its last checkpoint on --resume",
    OUT_OF_TIME: "stopped at the end of an epoch when the time budget was spent",
    NOT_STARTED: "trained no epoch: the time budget was spent first",
}
HISTORY_COLUMNS = ["trial_id", *(f.name for f in dataclasses.fields(EpochReport) if f.name != "diverged"),
                   "node", "start_epoch"]


def trial_id_of(result) -> str:
    """A Ray result's trial id (from its folder for a trial that never reported)."""
    return (result.metrics or {}).get("trial_id") or Path(str(result.path)).name.removeprefix("trial_")


def clock(seconds: float) -> str:
    """Seconds as `00h01m05s` (hours past 24 go on counting), the format of every duration shown."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def study_url(results_dir: Path, storage: str = "") -> str:
    """Where a search keeps its Optuna study: `search.storage` if given, else `results_dir/study.db`."""
    return storage or f"sqlite:///{Path(results_dir).resolve() / 'study.db'}"


def status_of(metrics: dict, ray_error, finished: bool) -> str:
    """A trial's status from its last metrics, Ray's error, and whether the search ran to its end."""
    if ray_error is not None or metrics.get("error"):
        return ERROR
    if metrics.get("diverged"):
        return DIVERGED
    if metrics.get("epoch", 0) >= metrics.get("epochs", math.inf):
        return COMPLETED
    return STOPPED if finished else UNFINISHED


def tables(grid, searched: list[str], *, finished: bool, open_ids=(), open_status: str = UNFINISHED
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) frames from a Ray `ResultGrid`; `finished` says the search ran to its end.
    `open_ids`: trials Ray has not ended (running, pending), given `open_status` unless they finished."""
    rows, history = [], []
    for result in grid:
        m = result.metrics or {}
        config = result.config or {}
        trial_id = trial_id_of(result)
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            frame = frame[frame.get("error", pd.Series("", index=frame.index)).fillna("") == ""]
            # One row per epoch: a trial restored after its driver died repeats its last report (or re-runs
            # the epoch after a checkpoint Ray had not yet saved); the latest row is the one that stands.
            frame = frame.drop_duplicates("epoch", keep="last")
            h = frame.reindex(columns=HISTORY_COLUMNS[1:]).assign(trial_id=trial_id)[HISTORY_COLUMNS]
            history.append(h)
        best = float(frame["accuracy"].max()) if frame is not None and len(frame) else math.nan
        error = m.get("error") or (str(result.error).splitlines()[0][:500] if result.error else "")
        status = status_of(m, result.error, finished)
        if trial_id in open_ids and status in (STOPPED, UNFINISHED):
            status = open_status
        rows.append({
            "trial_id": trial_id,
            "status": status,
            **{k: config.get(k) for k in searched},
            "epochs": config.get("epochs", m.get("epochs")),
            "epochs_run": int(m.get("epoch", 0) or 0),
            "accuracy": m.get("accuracy", math.nan),
            "best_accuracy": best,
            "valid_loss": m.get("valid_loss", math.nan),
            "train_loss": m.get("train_loss", math.nan),
            "time_s": round(float(m.get("time_total_s", math.nan)), 1),
            "error": error,
            "node": m.get("node", ""),
            "n_valid": m.get("n_valid", math.nan),  # images each accuracy was measured on
            "path": str(result.path),
            # multi-label: the threshold fitted on the holdout after training, and the score there
            **{k: m[k] for k in ("threshold", "fitted_accuracy") if k in m},
        })
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values("accuracy", ascending=False, kind="stable").reset_index(drop=True)
    hist = pd.concat(history, ignore_index=True) if history else pd.DataFrame(columns=HISTORY_COLUMNS)
    return trials, hist


def live_tables(results_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) from Ray's saved experiment state, for a search that has not written its tables:
    trials Ray had not ended are `interrupted` if the search was, else `unfinished`."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    run = yaml.safe_load((results_dir / "run.yaml").read_text()) if (results_dir / "run.yaml").is_file() else {}
    ray_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)  # a trial that has not reported yet has no metrics: not worth a warning
    try:
        analysis = ExperimentAnalysis(run.get("experiment", str(results_dir)))
    except ValueError:  # Ray's "check if you specified the correct experiment path": it saved nothing yet
        raise UserError(f"{results_dir}: the search recorded no trial yet (stopped before Ray saved its state); "
                        f"resume it or start it again") from None
    finally:
        ray_log.setLevel(level)
    open_ids = {t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")}
    open_status = INTERRUPTED if run.get("status") == INTERRUPTED else UNFINISHED
    return tables(ResultGrid(analysis), run.get("searched", []), finished=True, open_ids=open_ids,
                  open_status=open_status)


def _results_dir(results_dir) -> Path:
    p = Path(results_dir)
    # space.yaml makes a folder a search (runstate.status); trials.csv, a finished one from before it did
    if not p.is_dir() or not ((p / "space.yaml").is_file() or (p / "trials.csv").is_file()):
        raise UserError(f"{p} is not a results folder; give one that `tune-sota search` wrote, e.g. results/quick")
    return p


# Read back as text whatever is text, so that a trial id like "00123456" or a schedule like "32" stays so.
TEXT_COLUMNS = {"trial_id", "status", "error", "node", "path", "role"} | {
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
    return live_tables(p)[0]


def load_history(results_dir) -> pd.DataFrame:
    """One row per trial per epoch: trial id, epoch, training size, accuracy and losses."""
    p = _results_dir(results_dir)
    if (p / "history.csv").is_file():
        return _read_csv(p / "history.csv")
    return live_tables(p)[1]


EDGE = 0.05  # a winner within this share of its range's end (log scale for loguniform) is at the edge


def edge_notes(space, best: Config) -> list[str]:
    """One line per searched value of `best` at the edge of its range, with a wider range to try.
    `space`: the search's `Space` (its `space.yaml`). A bound the schema forbids is no edge."""
    from tune_sota.config import ConfigError, Dist, check_value

    notes = []
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, dist in space.searched.items():
        if not isinstance(dist, Dist) or dist.kind == "choice" or not hasattr(best, key):
            continue
        lo, hi, v = *dist.args, getattr(best, key)
        log = dist.kind == "loguniform"
        share = (math.log(v / lo) / math.log(hi / lo)) if log else (v - lo) / (hi - lo)
        at_top = v >= hi if dist.kind == "randint" else share >= 1 - EDGE
        at_bottom = v <= lo if dist.kind == "randint" else share <= EDGE
        if not (at_top or at_bottom):
            continue
        step = max(1, (hi - lo + 1) // 2) if dist.kind == "randint" else (hi - lo) / 2
        wider = (lo, hi * 2 if log else hi + step) if at_top else (lo / 2 if log else lo - step, hi)
        try:
            for bound in wider:
                check_value(fields[key], bound, "")
        except ConfigError:
            continue  # e.g. label_smoothing at 0: nothing lies below
        shown = ", ".join(f"{b:.3g}" if isinstance(b, float) else str(b) for b in wider)
        where = "top" if at_top else "bottom"
        notes.append(f"{key}={v:.4g} is at the {where} of its searched range [{lo:g}, {hi:g}]; the best may lie "
                     f"beyond: widen it, e.g. --set '{key}={{{dist.kind}: [{shown}]}}'")
    return notes


def load_confirm(results_dir) -> pd.DataFrame:
    """One row per confirmation run of a finished search: role (candidate or baseline), rank, source trial,
    seed, epochs, plain and TTA accuracy on val/, time, error, checkpoint."""
    p = _results_dir(results_dir)
    if not (p / "confirm.csv").is_file():
        raise UserError(f"{p} has no confirm.csv: the search confirmed nothing (confirm_top 0), or has not "
                        f"finished; `tune-sota trials {p}` shows its trials")
    return _read_csv(p / "confirm.csv").fillna({"trial_id": "", "path": ""})
