"""Runs a search, top-down: space -> checks -> Ray -> Tuner (schedule-fair ASHA + the Optuna searcher,
trials judged on a holdout) -> trial tables -> confirmation of the best against the baseline on val/ ->
`best.yaml`, `trials.csv`, `history.csv`, `confirm.csv` in `results/NAME/`.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd
import ray
import yaml
from ray import tune

from tune_sota import (
    budget,
    cluster,
    confirm,
    model,
    preflight,
    results,
    runstate,
    scheduler,
    searcher,
    sources,
    trainable,
    warmstart,
)
from tune_sota.config import (
    Config,
    Dist,
    Space,
    UserError,
    hold_epochs,
    parse_duration,
    parse_space,
    plain,
    space_to_yaml,
    write_atomic,
)
from tune_sota.progress import Progress, tracker_callbacks
from tune_sota.report import write_quietly
from tune_sota.schedule import rung_shares
from tune_sota.uncertainty import gain_line, selection_line, selection_noise

METRIC, MODE = "accuracy", "max"
log = logging.getLogger(__name__)


def max_epochs(space: Space) -> int:
    """The most epochs a trial of `space` can have."""
    e = space.values.get("epochs", Config.epochs)
    return int(max(e.args)) if isinstance(e, Dist) else int(e)


def free_name(name: str, *roots: Path) -> str:
    """`name`, or `name-2`, `name-3`... whichever no root has yet: results are never overwritten."""
    candidate, n = name, 1
    while any((root / candidate).exists() for root in roots):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


@functools.cache
def versions() -> dict[str, str]:
    """The versions that decide a result: tune_sota (and its git commit, in a checkout), Python, libraries.
    Read from the installed metadata: importing torch and fastai here would cost the driver seconds."""
    from tune_sota import __version__

    commit = _git_commit()
    return {"tune_sota": __version__ + (f" (git {commit})" if commit else ""), "python": platform.python_version(),
            **{name: metadata.version(name) for name in ("torch", "torchvision", "fastai", "ray", "optuna", "pandas")}}


def _git_commit() -> str:
    """The source tree's commit (with `+dirty` for uncommitted changes), or '' outside a git checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode or not (here / ".git").exists():
            return ""
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return ""


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
    confirmed: pd.DataFrame | None = None  # one row per confirmation run (confirm.csv)
    answer: dict | None = None  # confirm.answer: winner, baseline, gain
    select_on: str = "holdout"  # what the trials were judged on
    disk_bytes: int | None = None  # what the search keeps on disk once its checkpoints are pruned
    budget: dict | None = None  # how the time budget went (budget.TimeBudget.summary), with the phases' times
    export_dir: Path | None = None  # the winner's export (export.pkl, model.pt2), beside best.yaml
    metric: str = ""  # multi-label: what the accuracy figures are (multi_label_line); '' for single-label


def _locate(space: Space, name: str | None, results_root: Path, storage: str | None, resume: bool):
    """Where this search lives: (space, name, the name it replaced, results folder, Ray storage).

    A new search never takes a name in use; a resumed one is the named search, or the one unfinished
    search of the space (`runstate.target`), and takes its space and storage from its folder.
    """
    renamed_from = None
    if results_root.exists() and not results_root.is_dir():  # else a NotADirectoryError deep inside
        raise UserError(f"--results {results_root} is a file; give a folder for the results (it is made if missing)")
    if resume:
        name = runstate.target(results_root, name, space.name)  # a finished search is never resumed
        results_dir = results_root / name
        space = parse_space(yaml.safe_load((results_dir / "space.yaml").read_text()),
                            name=runstate.space_of(results_dir), source=str(results_dir / "space.yaml"))
        run_yaml = results_dir / "run.yaml"  # absent in folders from before it existed: storage was the results
        storage = (yaml.safe_load(run_yaml.read_text()) or {}).get("storage") if run_yaml.is_file() else None
    else:
        name = name or space.name
        roots = [results_root] + ([Path(storage)] if storage and "://" not in storage else [])
        fresh = free_name(name, *roots)
        renamed_from, name = (name if fresh != name else None), fresh
        results_dir = results_root / name
    storage = storage or str(results_root)
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return space, name, renamed_from, results_dir, storage


def run(space: Space, *, name: str | None = None, results_root: str | Path = "results", storage: str | None = None,
        address: str | None = None, resume: bool = False, command: str = "", out=None, log=(),
        warm_start=(), on_lost=None) -> Outcome:
    """Run (or resume) a search over `space`, confirm its best configs against the baseline, and write
    the results. `warm_start`: earlier results folders whose best configs are the first trials.
    `on_lost(SearchInterrupted) -> exit code`: how to tell the user when a signal took this search's Ray
    down with it (runstate `_Stop.watch`); the process then exits with that code at once."""
    t0 = time.time()
    out = out or say
    space, name, renamed_from, results_dir, storage = _locate(space, name, Path(results_root).resolve(), storage,
                                                             resume)
    space, held = hold_epochs(space)  # written so: a resumed search reads the epochs its trials trained
    preflight.check(space, address, out)
    for d in space.options("data"):  # download or write the data once here, not in every trial
        if not Path(d).expanduser().exists():
            sources.prepare_source(d)
    searched = list(space.searched)
    s = space.search
    first = _first_trials(space, warm_start, resume)  # before anything is written: a bad folder is one line
    cluster.connect(address, s)  # before anything is written: a cluster without the asked GPUs is an error
    if address:  # trials on other machines checkpoint to `storage`: it must be one folder they all see
        cluster.check_storage(storage, default=storage == str(Path(results_root).resolve()))
    stop = runstate.catch(out)  # Ctrl-C and SIGTERM stop the search cleanly from here (runstate.py)
    stop.on_lost = on_lost
    stop.watch(ray.get_runtime_context().gcs_address)  # a signal to the process group kills a local Ray too
    try:
        if resume:  # running again: a driver killed from here leaves unfinished trials, not interrupted ones
            runstate.mark(results_dir, runstate.RUNNING)
        else:  # claim the name: from here on this folder is this search's
            results_dir.mkdir(parents=True)
            write_atomic(results_dir / "run.yaml", yaml.safe_dump({
                "command": command, "name": name, "space": space.name, "status": runstate.RUNNING,
                "storage": storage, "experiment": f"{storage.rstrip('/')}/{name}", "searched": searched,
                "versions": versions()},
                sort_keys=False))
            # space.yaml last: it is what makes the folder a search (runstate.status), so a folder that
            # has it has its run.yaml too, whenever the driver is killed
            write_atomic(results_dir / "space.yaml", space_to_yaml(space.values, space.search, space.baseline))
            _record_splits(space, results_dir)
        stop.lost = lambda signum, cut: _interrupted(runstate.Stopped(signum, cut), name, results_dir, results_root,
                                                     address, t0, renamed_from)
        judged = f"a {s.holdout:.0%} holdout of train/" if s.select_on == "holdout" else "val/ (optimistic)"
        out(f"tune-sota: searching '{space.name}' as {name}: {s.num_samples} trials, "
            f"{', '.join(searched) or 'nothing'} searched, judged on {judged}; results in {results_dir}")
        if held:
            out(f"tune-sota: every trial trains {held} epochs, the top of the space's range (search.epochs: max; "
                f"search.epochs: searched samples it)")
        fn = tune.with_resources(tune.with_parameters(trainable.trial, **checkpoint_plan(space)),
                                 {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
        time_budget = None
        if resume and tune.Tuner.can_restore(f"{storage.rstrip('/')}/{name}"):  # else stopped before Ray saved
            tuner = tune.Tuner.restore(f"{storage.rstrip('/')}/{name}", trainable=fn, resume_unfinished=True,
                                       resume_errored=True)
            time_budget = budget.live(runstate.state_file(results_dir, "budget.json"))  # unpickled with the tuner
        else:
            tc = tune_config(space, name, results_dir)
            if first and isinstance(tc.search_alg, searcher.StudySearcher):
                tc.search_alg.enqueue(first)
                out(f"tune-sota: the first {len(first)} trial(s) are "
                    f"{', '.join(where for _, where in first)}")
            rc = run_config(space, name, storage, out, tracker_callbacks(log, results_dir, name, out))
            if isinstance(tc.scheduler, budget.TimeBudget):
                time_budget, rc.stop = tc.scheduler, budget.BudgetStop(tc.scheduler)
                if isinstance(tc.search_alg, searcher.StudySearcher):
                    tc.search_alg.stop_when = time_budget.is_spent
            tuner = tune.Tuner(fn, param_space=param_space(space), tune_config=tc, run_config=rc)
        t_trials = time.time()
        grid = tuner.fit()
        t_trials = time.time() - t_trials
        # ASHA's rung records in full, its journal folded in
        scheduler.compact(runstate.state_file(results_dir, "scheduler.json"))
        stop.check()  # after every phase: nothing later runs once Ctrl-C or SIGTERM came
        trials, history = results.tables(grid, searched, finished=True)
        budget_used = _budget_statuses(time_budget, trials, t_trials)
        study = _study(space, name, results_dir)  # opened once for the end of the search
        _close_study(study, set(trials.trial_id))
        configs = _configs(grid, trials)
        runs = confirm.plan(space, trials, configs)
        confirmed = pd.DataFrame(columns=confirm.COLUMNS)
        t_confirm = time.time()
        if runs:
            n_base = sum(r["role"] == confirm.BASELINE for r in runs)
            out(f"tune-sota: confirming the best {s.confirm_top} config(s) on val/ with {s.confirm_seeds} seed(s) "
                f"each, against the baseline ({n_base} run(s)); {len(runs)} runs")
            confirmed = confirm.run(runs, space=space, storage=storage, name=name, callbacks=[
                Progress([], len(runs), out), runstate.StopAtCheckpoint()])
        if budget_used is not None:
            budget_used["confirm_s"] = round(time.time() - t_confirm, 1)
        stop.check()
        ray.shutdown()
        stop.ray_done()  # a signal from here on stops the writing below at its next check, not through Ray
        # The tables, best.yaml, the export and the report take seconds: a SIGTERM among them (a scheduler's
        # grace period) leaves the search interrupted, and --resume writes them again, not half of them.
        answer = confirm.answer(confirmed) if len(confirmed) else None
        if answer:
            _tell_study(study, answer)
        trials = _with_confirmed(trials, confirmed)
        write_atomic(results_dir / "trials.csv", trials.to_csv(index=False))
        write_atomic(results_dir / "history.csv", history.to_csv(index=False))
        if len(confirmed):
            write_atomic(results_dir / "confirm.csv", confirmed.to_csv(index=False))
        best, best_row = _winner(space, trials, configs, answer)
        if best is not None:
            block = _result_block(space, best_row, answer, trials, name=name, command=command,
                                  wall_s=time.time() - t0)
            header = (f"# Best config of `{command}`; retrain it with: "
                      f"tune-sota train --config {results_dir}/best.yaml\n")
            if best.multi_label:  # the accuracy columns hold this score
                block = {**block, "metric": multi_label_line(best, space)}
            if budget_used is not None:
                block = {**block, "time_budget": plain(budget_used, nan=None)}
            write_atomic(results_dir / "best.yaml", header + space_to_yaml(best.to_dict(), result=block))
        stop.check()
        export_dir = _export_quietly(results_dir, out) if best is not None else None
        stop.check()
        write_quietly(results_dir, out)  # the report is a view of the files above: it never fails a search
        stop.check()
        runstate.mark(results_dir, runstate.FINISHED)  # from here on --resume refuses to touch it
    except runstate.Stopped as stopped:
        shutil.rmtree(results_dir / "export", ignore_errors=True)  # an unfinished search has no export
        raise _interrupted(stopped, name, results_dir, results_root, address, t0, renamed_from) from None
    finally:
        stop.release()
        ray.shutdown()

    disk = _prune_checkpoints(space, trials, best_row, results_dir, storage, name)  # last: every phase is done
    return Outcome(name, results_dir, trials, best, best_row, time.time() - t0, renamed_from, confirmed, answer,
                   s.select_on, disk, budget_used, export_dir,
                   multi_label_line(best, space) if best is not None and best.multi_label else "")


def multi_label_line(best: Config, space: Space) -> str:
    """What a multi-label search's `accuracy` figures are, and where the winner's threshold came from."""
    name = "F2 averaged per image" if best.multi_metric == "f2" else "accuracy_multi (right label decisions)"
    judged = space.values.get("threshold", Config.threshold)
    return (f"multi-label: every accuracy figure is {name}; trials were judged at threshold {judged:g}, the "
            f"winner's {best.threshold:g} was fitted on its holdout after training and is what the confirmation "
            f"and the export use (the baseline, which has no holdout to fit one, is scored at "
            f"{space.baseline_config().threshold:g})")


def _interrupted(stopped: runstate.Stopped, name: str, results_dir: Path, results_root, address: str | None,
                 t0: float, renamed_from: str | None) -> runstate.SearchInterrupted:
    """A search stopped by a signal: marked interrupted, its trials as Ray saved them, how to resume it."""
    runstate.mark(results_dir, runstate.INTERRUPTED)
    try:
        trials = results.live_tables(results_dir)[0]
    except Exception as e:  # stopped before Ray saved any state: there is nothing to tabulate yet
        log.debug("no trial table of the interrupted search: %s", e)
        trials = pd.DataFrame(columns=["trial_id", "status"])
    outcome = Outcome(name, results_dir, trials, None, {}, time.time() - t0, renamed_from)
    return runstate.SearchInterrupted(outcome, stopped.signum, runstate.command(name, results_root, address),
                                      stopped.cut)


def say(line: str) -> None:
    """A progress line, logged for the CLI to show (a module function: Tune pickles the callbacks that
    hold it, and after a first fit `print` itself no longer pickles)."""
    logging.getLogger("tune_sota.progress").info(line)


def _prune_checkpoints(space: Space, trials: pd.DataFrame, best_row: dict, results_dir: Path, storage: str,
                       name: str) -> int | None:
    """Delete the checkpoints nobody will load once the search is over: those of every trial but the best
    `max(1, confirm_top)` completed ones and the winner (`keep_checkpoints: all` keeps them all; the
    confirmation runs keep theirs). Returns the bytes the search keeps on disk (None on remote storage)."""
    if "://" in storage:
        return None
    experiment = Path(storage) / name
    if space.search.keep_checkpoints != "all" and len(trials):
        done = trials[trials.status == results.COMPLETED].head(max(1, space.search.confirm_top))
        freed = model.prune(trials.path, {*done.path, *([best_row["path"]] if best_row.get("path") else [])})
        log.info("removed %s of checkpoints of trials nobody will load", model.human(freed))
    return model.disk_usage(*{results_dir.resolve(), experiment.resolve()})


def param_space(space: Space) -> dict:
    """What Tune passes every trial besides the searcher's values: the fixed values, and the holdout the
    trials are judged on (none when selecting on val/)."""
    s = space.search
    return {**space.fixed_values(), "holdout": s.holdout if s.select_on == "holdout" else 0.0}


def checkpoint_plan(space: Space) -> dict:
    """What a trial needs to know to checkpoint only where it must (`trainable.checkpoint_epochs`): the
    rung shares of the space's schedule-fair ASHA and `search.checkpoint_every`."""
    s = space.search
    shares = rung_shares(s.grace, s.reduction_factor) if s.scheduler == "asha" else []
    return {"shares": shares, "every": s.checkpoint_every, "final_size": s.final_size_rungs}


def trial_dirname(trial) -> str:
    """Short trial folders: Ray's default name spells out every parameter and hits path limits."""
    return f"trial_{trial.trial_id}"


def make_searcher(space: Space, name: str, results_dir: Path):
    """The Optuna searcher over the space's distributions, its study in `search.storage` (None when
    nothing is searched)."""
    s = space.search
    if not space.searched:
        return None
    if s.searcher == "ray-optuna":  # what tune_sota's searcher replaces, kept to measure the difference
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space={k: searcher.distribution(d) for k, d in space.searched.items()}, metric=METRIC,
                            mode=MODE, sampler=searcher.sampler("tpe", s.seed, s.startup_trials))
    return searcher.StudySearcher(space.searched, storage=searcher.study_url(results_dir, s.storage),
                                  study_name=name, metric=METRIC, mode=MODE, kind=s.searcher, seed=s.seed,
                                  startup_trials=s.startup_trials, priors=s.priors)


def tune_config(space: Space, name: str, results_dir: Path) -> tune.TuneConfig:
    """Searcher, scheduler, sample count and concurrency of a search."""
    s = space.search
    early = scheduler.make_scheduler(s.scheduler, grace=s.grace,
                                     reduction_factor=s.reduction_factor, max_epochs=max_epochs(space),
                                     state_file=runstate.state_file(results_dir, "scheduler.json"),
                                     final_size=s.final_size_rungs)
    if s.time_budget:  # no new trial once spent; running ones stop at the end of their epoch (budget.py)
        early = budget.TimeBudget(early, parse_duration(s.time_budget), runstate.state_file(results_dir, "budget.json"))
    return tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(space, name, results_dir),
                           scheduler=early, num_samples=s.num_samples,
                           max_concurrent_trials=s.max_concurrent or None, trial_dirname_creator=trial_dirname,
                           # A trial after the first starts in the process of one that finished: no
                           # new worker importing torch and fastai (seconds each on a small machine).
                           reuse_actors=True)


def run_config(space: Space, name: str, storage: str, out, trackers=()) -> tune.RunConfig:
    """Where a search's trials live, its progress lines, checkpoints kept and retries."""
    s = space.search
    return tune.RunConfig(
        name=name, storage_path=storage, verbose=0,
        callbacks=[Progress(list(space.searched), s.num_samples, out), runstate.StopAtCheckpoint(), *trackers],
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None if s.keep_checkpoints == "all" else s.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=3),  # lost workers/nodes; trial errors are not retried
    )


def _first_trials(space: Space, warm_start, resume: bool) -> list[tuple[dict, str]]:
    """The trials to enqueue first (warmstart.plan): none on resume (the study has them already)."""
    if resume or not (warm_start or space.search.baseline_first):
        return []
    if warm_start and (not space.searched or space.search.searcher == "ray-optuna"):
        raise UserError("--warm-start needs a space that searches something with searcher tpe or random "
                        "(Ray's OptunaSearch keeps no study to enqueue into)")
    return warmstart.plan(space, warm_start, top=space.search.startup_trials) if space.searched else []


def _record_splits(space: Space, results_dir: Path) -> None:
    """Copy the split of every data value that drew its own val/ (sources.split_view) into the results,
    as `split.csv` (`split-2.csv`... for more data values): which image the confirmation scores on."""
    n = 0
    for d in space.options("data"):
        record = sources.split_record(d)
        if record is not None:
            n += 1
            write_atomic(results_dir / ("split.csv" if n == 1 else f"split-{n}.csv"), record.read_text())


def _budget_statuses(b: budget.TimeBudget | None, trials: pd.DataFrame, trials_s: float) -> dict | None:
    """With a time budget: mark the trials it stopped `out_of_time` and those it kept from starting
    `not_started` (in place), and return how it went (None without a budget)."""
    if b is None:
        return None
    stopped = trials.status == results.STOPPED
    trials.loc[stopped & trials.trial_id.isin(b.out_of_time), "status"] = results.OUT_OF_TIME
    if b.spent_after is not None and len(trials):
        trials.loc[stopped & (trials.epochs_run == 0), "status"] = results.NOT_STARTED
    return {**b.summary(), "trials_s": round(trials_s, 1)}


def _export_quietly(results_dir: Path, out) -> Path | None:
    """Export the winner beside best.yaml (export.pkl, model.pt2); a failure is a warning, never a failed search."""
    try:
        from tune_sota import export

        # a driver killed (-9) between its export and `finished` left this unfinished search's own export
        shutil.rmtree(results_dir / "export", ignore_errors=True)
        return export.export(results_dir / "best.yaml", results_dir / "export")
    except Exception as e:  # noqa: BLE001  (the search's results stand without it)
        first = str(e).splitlines()[0] if str(e) else ""
        out(f"tune-sota: warning: the winner was not exported ({type(e).__name__}: {first}); "
            f"try: tune-sota export {results_dir}/best.yaml --out DIR")
        return None


def _study(space: Space, name: str, results_dir: Path) -> searcher.StudySearcher | None:
    """The search's study on disk, through its searcher (None when nothing is searched or the searcher is
    Ray's own, which keeps no study)."""
    searcher_ = make_searcher(space, name, results_dir)
    return searcher_ if isinstance(searcher_, searcher.StudySearcher) else None


def _close_study(study: searcher.StudySearcher | None, ray_ids: set[str]) -> None:
    """Fail study trials that Ray never recorded (a driver killed between the two saves)."""
    if study is not None and study.abandon_unknown(ray_ids):
        log.info("study: trials of a killed driver that Ray never recorded are marked failed")


def _tell_study(study: searcher.StudySearcher | None, answer: dict) -> None:
    """Put the confirmed answer in the study too (a study attribute: Optuna's finished trials are read-only),
    so that whoever opens study.db sees which trial won on val/ and by how much."""
    if study is not None:
        study.record_answer(plain(answer, nan=None))


def _with_confirmed(trials: pd.DataFrame, confirmed: pd.DataFrame) -> pd.DataFrame:
    """The trial table with each confirmed trial's mean val/ accuracy, plainly and with TTA."""
    trials = trials.copy()
    trials["confirmed_accuracy"], trials["confirmed_tta"] = math.nan, math.nan
    ok = confirmed[(confirmed.role == confirm.CANDIDATE) & (confirmed.error.fillna("") == "")]
    for trial_id, runs in ok.groupby("trial_id"):
        at = trials.trial_id == trial_id
        trials.loc[at, "confirmed_accuracy"] = runs.accuracy.mean()
        trials.loc[at, "confirmed_tta"] = runs.tta_accuracy.mean()
    return trials


def _configs(grid, trials: pd.DataFrame) -> dict[str, Config]:
    """The resolved config of every completed trial (what confirmation and export use), by trial id; a
    failed trial may hold a config that never validated (a sampled size against a fixed schedule)."""
    done = set(trials[trials.status == results.COMPLETED].trial_id)
    # a multi-label trial goes on with the threshold it fitted on its holdout (confirmation, best.yaml, export)
    fitted = lambda r: {"threshold": r.metrics["threshold"]} if "threshold" in (r.metrics or {}) else {}  # noqa: E731
    return {results.trial_id_of(r): Config(**{**r.config, **fitted(r)}) for r in grid if results.trial_id_of(r) in done}


def _winner(space: Space, trials: pd.DataFrame, configs: dict[str, Config], answer: dict | None):
    """(config, trial row) of the best confirmed mean, or of the best completed trial when nothing was
    confirmed; (None, {}) when no trial trained all its epochs."""
    done = trials[trials.status == results.COMPLETED]
    if done.empty:
        return None, {}
    trial_id = answer["winner"]["trial_id"] if answer else done.trial_id.iloc[0]
    row = trials[trials.trial_id == trial_id].iloc[0].to_dict()
    return Config(**{**configs[trial_id].to_dict(), "holdout": 0.0}), row


def _result_block(space: Space, row: dict, answer: dict | None, trials: pd.DataFrame, *, name: str, command: str,
                  wall_s: float) -> dict:
    """best.yaml's `result:`: what was chosen on what, the confirmed figures, the gain, the cost."""
    s = space.search
    block = {"search": name, "trial_id": row["trial_id"], "select_on": s.select_on,
             "selection_accuracy": row["accuracy"]}
    if answer:
        w, b = answer["winner"], answer["baseline"]
        block.update(accuracy=w["accuracy_mean"], tta_accuracy=w["tta_mean"],
                     winner={k: v for k, v in w.items() if k not in ("trial_id", "checkpoint")}, baseline=b,
                     gain_points=answer.get("gain_points"), gain_tta_points=answer.get("gain_tta_points"))
        if answer.get("gain"):  # the gain's 95% interval, verdict and the seeds that would resolve it
            g = answer["gain"]
            block.update(gain_interval_points=[g["low"], g["high"]], verdict=g["verdict"],
                         seeds_to_resolve=g["seeds_to_resolve"], gain_statement=gain_line(g))
    else:
        why = "confirm_top 0" if not s.confirm_top else "every confirmation run failed: see confirm.csv"
        block.update(accuracy=row["accuracy"], tta_accuracy=None, note=f"not confirmed ({why})")
    noise = selection_noise(trials)
    if noise:
        block["selection_noise"] = {**noise, "statement": selection_line(noise, s.select_on)}
    block.update(cost={"search_trial_s": float(trials.time_s.sum()),
                       "confirm_trial_s": answer["confirm_s"] if answer else 0.0, "wall_s": wall_s},
                 command=command, checkpoint=row.get("path", ""), versions=versions())
    if answer:  # the winner retrained on all of train/ (its first seed): the model to load and use
        block["confirmed_checkpoint"] = answer["winner"]["checkpoint"]
    return plain(block, nan=None)


def command_line() -> str:
    return " ".join(["tune-sota", *sys.argv[1:]])

