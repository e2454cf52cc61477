"""Confirmation: the step that turns a search's pick into an answer you can trust.

A search picks the trial with the highest of N holdout accuracies, which flatters it twice: by the
choice of a maximum, and by one seed. So the best `confirm_top` trials' configs are retrained on all of
train/ with `confirm_seeds` seeds each and scored on val/ (touched by nothing before), plainly and with
test-time augmentation; beside them runs the baseline (the space's `baseline:`, chapter 7's plain
recipe by default) with the same seeds and the same epochs. The winner is the best confirmed mean, and
the gain is its mean minus the baseline's, in points, with its 95% interval and a verdict
(`uncertainty.gain`).

The runs are a second Ray Tune experiment (`confirm/` inside the search's), with the trials'
resources: they spread over a cluster in parallel, checkpoint as search trials do, and a resumed search
restores them like trials instead of redoing the finished ones.
"""

from __future__ import annotations

import math

import pandas as pd
from ray import tune

from tune_sota import results, trainable, uncertainty
from tune_sota.config import Config, Space

CANDIDATE, BASELINE = "candidate", "baseline"
COLUMNS = ["role", "rank", "trial_id", "seed", "epochs", "accuracy", "tta_accuracy", "time_s", "error", "path"]


def plan(space: Space, trials: pd.DataFrame, configs: dict[str, Config]) -> list[dict]:
    """The runs: each of the top completed trials' configs and the baseline, at every confirm seed, on
    all of train/ (no holdout). `configs` maps trial ids to their resolved configs."""
    s = space.search
    done = trials[trials.status == results.COMPLETED].head(s.confirm_top)
    seeds = [space.values.get("seed", Config.seed) + i for i in range(s.confirm_seeds)]
    runs = []
    for rank, trial_id in enumerate(done.trial_id, start=1):
        cfg = configs[trial_id]
        runs += [{"role": CANDIDATE, "rank": rank, "trial_id": trial_id,
                  "config": {**cfg.to_dict(), "holdout": 0.0, "seed": seed}} for seed in seeds]
    for epochs in sorted({configs[t].epochs for t in done.trial_id}):  # the same epochs as each candidate
        base = space.baseline_config(epochs=epochs, holdout=0.0)
        runs += [{"role": BASELINE, "rank": 0, "trial_id": "", "config": {**base.to_dict(), "seed": seed}}
                 for seed in seeds]
    return runs


def run(runs: list[dict], *, space: Space, storage: str, name: str, callbacks: list) -> pd.DataFrame:
    """Run (or finish, after a resume) the confirmation runs; one row per run (`COLUMNS`)."""
    s = space.search
    where = f"{storage.rstrip('/')}/{name}"
    fn = tune.with_resources(tune.with_parameters(trainable.confirmation, every=s.checkpoint_every),
                             {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    if tune.Tuner.can_restore(f"{where}/confirm"):
        tuner = tune.Tuner.restore(f"{where}/confirm", trainable=fn, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            fn, param_space={"run": tune.grid_search(runs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=s.max_concurrent or None, reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"run_{t.trial_id}"),
            run_config=tune.RunConfig(name="confirm", storage_path=where, verbose=0, callbacks=callbacks,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=3)))
    return table(tuner.fit())


def table(grid) -> pd.DataFrame:
    """One row per confirmation run from Ray's results."""
    rows = []
    for r in grid:
        m, spec = r.metrics or {}, (r.config or {}).get("run", {})
        error = m.get("error") or (str(r.error).splitlines()[0][:500] if r.error else "")
        rows.append({"role": spec.get("role"), "rank": spec.get("rank"), "trial_id": spec.get("trial_id", ""),
                     "seed": spec.get("config", {}).get("seed"), "epochs": spec.get("config", {}).get("epochs"),
                     "accuracy": m.get("accuracy", math.nan) if not error else math.nan,
                     "tta_accuracy": m.get("tta_accuracy", math.nan) if not error else math.nan,
                     "time_s": round(float(m.get("time_total_s", math.nan)), 1), "error": error,
                     "path": str(r.checkpoint.path) if r.checkpoint else ""})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    order = frame.assign(baseline_last=frame.role == BASELINE).sort_values(["baseline_last", "rank", "seed"],
                                                                           kind="stable")
    return order.drop(columns="baseline_last").reset_index(drop=True)


def _stats(runs: pd.DataFrame) -> dict:
    ok = runs[runs.error.fillna("") == ""]
    return {"accuracy_mean": ok.accuracy.mean(), "accuracy_std": ok.accuracy.std(ddof=1) if len(ok) > 1 else 0.0,
            "tta_mean": ok.tta_accuracy.mean(), "tta_std": ok.tta_accuracy.std(ddof=1) if len(ok) > 1 else 0.0,
            "seeds": [int(v) for v in ok.seed], "epochs": int(runs.epochs.iloc[0]), "time_s": float(runs.time_s.sum())}


def answer(confirm: pd.DataFrame) -> dict | None:
    """The winner (best confirmed mean), its baseline at the same epochs, and the gain in points (`gain`:
    its interval and verdict); None when no candidate run succeeded."""
    cands = confirm[(confirm.role == CANDIDATE) & (confirm.error.fillna("") == "")]
    if cands.empty:
        return None
    means = cands.groupby("trial_id").accuracy.mean()
    best = means.idxmax()
    runs = confirm[confirm.trial_id == best]
    winner = {"trial_id": best, **_stats(runs), "checkpoint": runs[runs.error.fillna("") == ""].path.iloc[0]}
    base_runs = confirm[(confirm.role == BASELINE) & (confirm.epochs == winner["epochs"])]
    out = {"winner": winner, "baseline": _stats(base_runs) if len(base_runs) else None}
    if out["baseline"] is not None:
        out["gain_points"] = 100 * (winner["accuracy_mean"] - out["baseline"]["accuracy_mean"])
        out["gain_tta_points"] = 100 * (winner["tta_mean"] - out["baseline"]["tta_mean"])
        ok = runs[runs.error.fillna("") == ""], base_runs[base_runs.error.fillna("") == ""]
        out["gain"] = uncertainty.gain(list(ok[0].accuracy), list(ok[1].accuracy))  # interval, verdict, seeds
    out["confirm_s"] = float(confirm.time_s.sum())
    return out
