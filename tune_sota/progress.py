"""Watching a running search: one line per epoch and per trial (with the best so far, the elapsed
time and an estimate of the time left), and the trackers `--log` adds (MLflow, W&B) through Ray's
own logger callbacks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from tune_sota import results
from tune_sota.config import UserError

log = logging.getLogger(__name__)


# A search of more trials than this prints one line per trial's end (and per epoch that sets a new best), not
# a line per start and per epoch: at a thousand trials the rest is thousands of lines no one reads.
QUIET_AFTER = 100


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


class Progress(tune.Callback):
    """One line per finished epoch and per finished trial, instead of Ray's status tables.

    Every line ends with the best accuracy any trial has reached so far and the elapsed time; a
    finished trial's line also estimates the time left, from the wall-clock time the finished trials
    took (start-up included) and how many trials have run at once. Past QUIET_AFTER trials only the
    lines of trials' ends and of new bests are written.
    """

    def __init__(self, searched: list[str], num_samples: int, out=print):
        self.searched, self.num_samples, self.out, self.done = searched, num_samples, out, 0
        self.best, self.best_id = None, ""
        self.t0 = time.monotonic()
        self.running: dict[str, float] = {}  # trial id -> when it started (time.monotonic)
        self.finished_s: list[float] = []  # wall-clock seconds of each finished trial
        self.most_at_once = 1

    def __getstate__(self):
        # Ray pickles the callbacks with the experiment. It also swaps builtins.print for its own once a
        # progress bar or status line has been shown, and the original `print` then no longer pickles by
        # name: store None, which means print (whichever print exists when the line is written).
        state = dict(self.__dict__)
        if getattr(state["out"], "__name__", "") == "print" and getattr(state["out"], "__module__", "") == "builtins":
            state["out"] = None
        return state

    def say(self, line: str) -> None:
        """Write one progress line through `out` (print by default)."""
        (self.out or print)(line)

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.t0 = time.monotonic()  # the search starts now, not when the callback was built (or pickled)
        self._count_ended = True  # a resumed search's [n/N] goes on from the trials it has already ended

    def on_step_begin(self, iteration, trials, **info):
        if getattr(self, "_count_ended", False):  # the first step: restored trials are in `trials` by now
            self.done, self._count_ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials), False

    def _params(self, trial) -> str:
        return " ".join(f"{k}={_short(trial.config.get(k))}" for k in self.searched)

    def _status_tail(self) -> str:
        best = f"best {self.best:.4f}" if self.best is not None else "best -"
        return f"{best}  {results.clock(time.monotonic() - self.t0)}"

    def eta(self) -> float | None:
        """Seconds left, estimated; None before a trial has finished."""
        if not self.finished_s or not self.num_samples:
            return None
        mean, now = sum(self.finished_s) / len(self.finished_s), time.monotonic()
        left = max(0, self.num_samples - self.done) * mean - sum(min(now - t, mean) for t in self.running.values())
        return max(0.0, left) / self.most_at_once

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.setdefault(trial.trial_id, time.monotonic())  # a retried trial keeps its start
        self.most_at_once = max(self.most_at_once, len(self.running))
        if not self.quiet:
            self.say(f"  start  {trial.trial_id}  {self._params(trial)}")

    @property
    def quiet(self) -> bool:
        """Whether the search is too large for start and epoch lines (QUIET_AFTER)."""
        return (self.num_samples or 0) > QUIET_AFTER

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("error") or result.get("diverged"):
            return
        new_best = self.best is None or result["accuracy"] > self.best
        if new_best:
            self.best, self.best_id = result["accuracy"], trial.trial_id
        if new_best or not self.quiet:
            self.say(f"  epoch  {trial.trial_id}  {result['epoch']}/{result['epochs']} at {result['size']}px  "
                     f"accuracy {result['accuracy']:.4f}  valid_loss {result['valid_loss']:.4f}  | "
                     f"{self._status_tail()}" + ("  (new best)" if new_best and self.quiet else ""))

    def _finish(self, trial) -> None:
        self.done += 1
        started = self.running.pop(trial.trial_id, None)
        if started is not None:
            self.finished_s.append(time.monotonic() - started)

    def _tail(self) -> str:
        eta = self.eta()
        left = f", ~{results.clock(eta)} left" if eta is not None and self.done < self.num_samples else ""
        return f"  | {self._status_tail()} elapsed{left}"

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial)
        r = trial.last_result or {}
        status = results.status_of(r, None, finished=True)
        how = f"{status} after {r.get('epoch', 0)}/{r.get('epochs', '?')} epochs"
        if r.get("error"):
            how += f": {r['error']}"
        self.say(f"  [{self.done}/{self.num_samples}] {trial.trial_id} {how}, accuracy {r.get('accuracy', 0):.4f}"
                 f"{self._tail()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial)
        self.say(f"  [{self.done}/{self.num_samples}] {trial.trial_id} error (Ray): see {trial.path}{self._tail()}")


# --log KIND[=WHERE]: the package that provides each tracker (what to pip install when it is missing).
TRACKERS = {"mlflow": "mlflow-skinny", "wandb": "wandb"}


@dataclass(frozen=True)
class Tracker:
    """One `--log` value: `mlflow` (optionally =tracking URI or .db path) or `wandb` (optionally =project)."""

    kind: str
    where: str = ""


def parse_log(values: list[str] | None) -> list[Tracker]:
    """`--log` values as trackers; an unknown tracker or a missing package is a UserError."""
    trackers = []
    for value in values or ():
        kind, _, where = value.partition("=")
        if kind not in TRACKERS:
            raise UserError(f"--log {value}: unknown tracker '{kind}'; use mlflow, mlflow=URI, wandb or wandb=PROJECT")
        if importlib.util.find_spec(kind) is None:
            raise UserError(f"--log {kind}: the {kind} package is not installed; "
                            f"pip install 'tune_sota[{kind}]' (or pip install {TRACKERS[kind]})")
        trackers.append(Tracker(kind, where))
    return trackers


def mlflow_uri(where: str, results_dir: Path) -> str:
    """The MLflow tracking URI of `--log mlflow[=WHERE]`: default an SQLite store in the results folder;
    a plain path is an SQLite file (MLflow 3 refuses its old folder store)."""
    if "://" in where:
        return where
    path = Path(where) if where else Path(results_dir) / "mlflow.db"
    return f"sqlite:///{path.resolve()}"


def _wandb_has_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def tracker_callbacks(trackers: list[Tracker], results_dir: Path, name: str, out=print) -> list[tune.Callback]:
    """Ray's logger callbacks for the trackers: one MLflow or W&B run per trial, metrics per epoch."""
    made = []
    for t in trackers:
        if t.kind == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            for noisy in ("mlflow", "alembic"):  # table creation notices on every new store
                logging.getLogger(noisy).setLevel(logging.WARNING)
            uri = mlflow_uri(t.where, results_dir)
            if not t.where:  # our own store: keep its artifact folder beside it, not in the working directory
                _mlflow_experiment(uri, name, Path(results_dir) / "mlflow-artifacts")
            made.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name, tags={"search": name}))
            out(f"tune-sota: logging to MLflow at {uri} (experiment '{name}', one run per trial)")
        else:
            from ray.air.integrations.wandb import WandbLoggerCallback

            extra = {}
            if not _wandb_has_key() and os.environ.get("WANDB_MODE") not in ("online", "disabled"):
                # no key: runs are written offline in each trial's folder; `wandb sync` uploads them later
                os.environ["WANDB_MODE"] = "offline"
                extra["mode"] = "offline"
            project = t.where or os.environ.get("WANDB_PROJECT") or "tune_sota"
            made.append(WandbLoggerCallback(project=project, group=name, **extra))
            where = "offline, in each trial folder's wandb/ (upload with `wandb sync`)" if extra else "online"
            out(f"tune-sota: logging to W&B project '{project}', group '{name}', {where}")
    return made


def _mlflow_experiment(uri: str, name: str, artifacts: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())
