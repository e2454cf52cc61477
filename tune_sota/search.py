"""Assembles and runs a search: space -> Tuner (ASHA + Optuna) -> trials -> TTA on the best ->
`best.yaml`, `trials.csv`, `history.csv` in `results/NAME/`.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import ray
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tune_sota import cluster, data, preflight, results, trainable
from tune_sota.config import Config, Dist, Space, UserError, parse_space, space_to_yaml, write_atomic
from tune_sota.progress import Progress, tracker_callbacks
from tune_sota.report import write_quietly

METRIC, MODE = "accuracy", "max"


class PrunedAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, except that Optuna learns the truth about trials that did not finish.

    Ray tells Optuna that a trial ASHA stopped *completed* with its partial-budget accuracy, which
    TPE then ranks beside fully trained trials. Here such a trial is told as PRUNED (Optuna keeps
    its per-epoch intermediate values, reported by `on_trial_result`), and a trial that diverged or
    raised is told as FAIL. After each trial the study's trials are written to `study_log` (CSV).
    """

    def __init__(self, *args, study_log: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.study_log = study_log
        self._steps: dict[str, set[int]] = {}  # intermediate values already told, per trial

    def on_trial_result(self, trial_id: str, result: dict):
        super().on_trial_result(trial_id, result)
        self._steps.setdefault(trial_id, set()).add(result["training_iteration"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        known = trial_id in self._ot_trials and trial_id not in self._completed_trials
        if known and result and not result.get("error") and not result.get("diverged") and \
                result["training_iteration"] not in self._steps.get(trial_id, ()):
            # Tune hands the result that ASHA stopped a trial on only to this method, never to
            # on_trial_result: record it as an intermediate value too.
            self._ot_trials[trial_id].report(result[self.metric], result["training_iteration"])
        if known and (error or (result or {}).get("error") or (result or {}).get("diverged")):
            self._tell(trial_id, TrialState.FAIL)
        elif known and result and result.get("epoch", 0) < result.get("epochs", 0):
            self._tell(trial_id, TrialState.PRUNED)
        else:
            super().on_trial_complete(trial_id, result, error)
        self._write_log()

    def _tell(self, trial_id: str, state: TrialState):
        self._ot_study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)

    def _write_log(self):
        if not self.study_log:
            return
        ray_ids = {t.number: tid for tid, t in self._ot_trials.items()}
        rows = [{"number": t.number, "trial_id": ray_ids.get(t.number, ""), "state": t.state.name,
                 "value": t.value, "intermediate": json.dumps([t.intermediate_values[k]
                                                               for k in sorted(t.intermediate_values)]),
                 **t.params} for t in self._ot_study.get_trials(deepcopy=False)]
        write_atomic(Path(self.study_log), pd.DataFrame(rows).to_csv(index=False))

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


def to_tune(v):
    """A space value as Ray Tune sees it (Optuna's conversion then takes it from there)."""
    if not isinstance(v, Dist):
        return v
    if v.kind == "randint":  # inclusive in our files, exclusive upper bound in Tune
        return tune.randint(v.args[0], v.args[1] + 1)
    return getattr(tune, v.kind)(*v.args) if v.kind != "choice" else tune.choice(list(v.args))


def max_epochs(space: Space) -> int:
    e = space.values.get("epochs", Config.epochs)
    return int(max(e.args)) if isinstance(e, Dist) else int(e)


def free_name(name: str, *roots: Path) -> str:
    """`name`, or `name-2`, `name-3`... whichever no root has yet: results are never overwritten."""
    candidate, n = name, 1
    while any((root / candidate).exists() for root in roots):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def versions() -> dict[str, str]:
    import fastai
    import torch
    import torchvision

    from tune_sota import __version__

    mods = {"torch": torch, "torchvision": torchvision, "fastai": fastai, "ray": ray, "optuna": optuna, "pandas": pd}
    return {"tune_sota": __version__, "python": platform.python_version(),
            **{name: str(m.__version__) for name, m in mods.items()}}


@dataclass
class Outcome:
    """What a finished search found and where it wrote it."""

    name: str
    results_dir: Path
    trials: pd.DataFrame
    best: Config | None
    best_row: dict
    wall_s: float
    renamed_from: str | None = None


# Kept for callers of the old name; the code lives in tune_sota.cluster.
_connect = cluster.connect


def _locate(space: Space, name: str | None, results_root: Path, storage: str | None, resume: bool):
    """Where this search lives: (space, name, the name it replaced, results folder, Ray storage).

    A new search never takes a name in use; a resumed one takes its space and storage from its folder.
    """
    name = name or space.name
    renamed_from = None
    if resume:
        results_dir = results_root / name
        if not (results_dir / "space.yaml").is_file():
            raise UserError(f"--resume: {results_dir} holds no search to resume; drop --resume to start one")
        space = parse_space(yaml.safe_load((results_dir / "space.yaml").read_text()), name=space.name,
                            source=str(results_dir / "space.yaml"))
        storage = yaml.safe_load((results_dir / "run.yaml").read_text())["storage"]
    else:
        roots = [results_root] + ([Path(storage)] if storage and "://" not in storage else [])
        fresh = free_name(name, *roots)
        renamed_from, name = (name if fresh != name else None), fresh
        results_dir = results_root / name
    storage = storage or str(results_root)
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return space, name, renamed_from, results_dir, storage


def run(space: Space, *, name: str | None = None, results_root: str | Path = "results", storage: str | None = None,
        address: str | None = None, resume: bool = False, command: str = "", out=print, log=()) -> Outcome:
    """Run (or resume) a search over `space`, score the best trials with TTA, and write the results."""
    t0 = time.time()
    space, name, renamed_from, results_dir, storage = _locate(space, name, Path(results_root).resolve(), storage,
                                                             resume)
    preflight.check(space, address, out)
    for d in space.options("data"):  # download or write the data once here, not in every trial
        if not Path(d).expanduser().exists():
            data.prepare_source(d)
    searched = list(space.searched)
    s = space.search
    cluster.connect(address, s)  # before anything is written: a cluster without the asked GPUs is an error
    try:
        if not resume:  # claim the name: from here on this folder is this search's
            results_dir.mkdir(parents=True)
            write_atomic(results_dir / "space.yaml", space_to_yaml(space.values, space.search))
            write_atomic(results_dir / "run.yaml", yaml.safe_dump({
                "command": command, "name": name, "storage": storage,
                "experiment": f"{storage.rstrip('/')}/{name}", "searched": searched, "versions": versions()},
                sort_keys=False))
        out(f"tune-sota: searching '{space.name}' as {name}: {s.num_samples} trials, "
            f"{', '.join(searched) or 'nothing'} searched; results in {results_dir}")
        fn = tune.with_resources(trainable.trial, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
        if resume:
            tuner = tune.Tuner.restore(f"{storage.rstrip('/')}/{name}", trainable=fn, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(fn, param_space={k: to_tune(v) for k, v in space.values.items()},
                               tune_config=tune_config(space, results_dir),
                               run_config=run_config(space, name, storage, out,
                                                     tracker_callbacks(log, results_dir, name, out)))
        grid = tuner.fit()
        trials, history = results.tables(grid, searched, finished=True)
        best_row, best = _score_best(grid, trials, space, out, local=address is None)
    finally:
        ray.shutdown()

    write_atomic(results_dir / "trials.csv", trials.to_csv(index=False))
    write_atomic(results_dir / "history.csv", history.to_csv(index=False))
    if best is not None:
        block = {k: best_row[k] for k in ("accuracy", "tta_accuracy", "epochs_run", "trial_id")}
        block.update(search=name, command=command, checkpoint=best_row["path"], versions=versions())
        header = f"# Best trial of `{command}`; retrain it with: tune-sota train --config {results_dir}/best.yaml\n"
        write_atomic(results_dir / "best.yaml", header + space_to_yaml(best.to_dict(), result=_plain(block)))
    write_quietly(results_dir, out)  # the report is a view of the files above: it never fails a search
    return Outcome(name, results_dir, trials, best, best_row, time.time() - t0, renamed_from)


def trial_dirname(trial) -> str:
    """Short trial folders: Ray's default name spells out every parameter and hits path limits."""
    return f"trial_{trial.trial_id}"


def tune_config(space: Space, results_dir: Path) -> tune.TuneConfig:
    s = space.search
    searcher = None
    if space.searched:
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials)
        searcher = PrunedAwareOptunaSearch(sampler=sampler, study_log=str(results_dir / "optuna.csv"))
    scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs(space), grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor)
    return tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                           num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent or None,
                           trial_dirname_creator=trial_dirname,
                           # A trial after the first starts in the process of one that finished: no
                           # new worker importing torch and fastai (seconds each on a small machine).
                           reuse_actors=True)


def run_config(space: Space, name: str, storage: str, out, trackers=()) -> tune.RunConfig:
    s = space.search
    return tune.RunConfig(
        name=name, storage_path=storage, verbose=0,
        callbacks=[Progress(list(space.searched), s.num_samples, out), *trackers],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=3),  # lost workers/nodes; trial errors are not retried
    )


def _score_best(grid, trials: pd.DataFrame, space: Space, out, *, local: bool) -> tuple[dict, Config | None]:
    """TTA-score the top completed trials from their last checkpoints; the best by plain accuracy wins.
    `local`: Ray runs on this machine only, so score here rather than in a new Ray worker."""
    done = trials[trials.status == results.COMPLETED]
    if done.empty:
        return {}, None
    by_path = {str(r.path): r for r in grid}
    top = done.head(space.search.score_top)
    s = space.search
    out(f"tune-sota: scoring the best {len(top)} trial(s) with test-time augmentation")
    runs = {i: (by_path[row.path].config, by_path[row.path].checkpoint) for i, row in top.iterrows()}
    if local:  # this process has fastai loaded and the trials' resources are free: no worker to start
        scores = {i: trainable.score(config, ckpt) for i, (config, ckpt) in runs.items()}  # with every CPU
    else:  # on the cluster's nodes, where the GPUs are
        refs = {i: trainable.score_remote(config, ckpt, cpus=s.cpus_per_trial, gpus=s.gpus_per_trial)
                for i, (config, ckpt) in runs.items()}
        scores = {i: ray.get(ref) for i, ref in refs.items()}
    for i, scored in scores.items():
        trials.loc[i, "tta_accuracy"] = scored["tta_accuracy"]
    best_row = trials.loc[top.index[0]].to_dict()
    best = space.resolve({k: by_path[best_row["path"]].config[k] for k in space.searched})
    return best_row, best


def _plain(d: dict) -> dict:
    """numpy/pandas scalars as plain YAML values."""
    out = {}
    for k, v in d.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def command_line() -> str:
    return " ".join(["tune-sota", *sys.argv[1:]])

