"""search_figures: one real search of a shipped space, run as a user runs it, and the figures that say
whether its answer can be trusted: wall time, trials by how they ended, ASHA's stops by share of
schedule, the confirmed winner against the baseline (mean ± std over seeds, plain and with TTA), the
gain and its cost.

    python bench/search_figures.py                          # imagenette-cpu on ../shared/data/imagenette2-128
    python bench/search_figures.py --space quick            # the offline default
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, record, shared_data, table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="imagenette-cpu", help="search space (default: imagenette-cpu)")
    p.add_argument("--data", help="image folder for imagenette-cpu (default: ../shared/data/imagenette2-128)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    extra = []
    if args.space == "imagenette-cpu":
        extra = ["--set", f"data={shared_data(args.data)}"]
    tmp = Path(tempfile.mkdtemp(prefix="tune_sota_figures_"))
    env = {**os.environ, "TUNE_SOTA_CACHE": os.environ.get("TUNE_SOTA_CACHE", str(tmp / "cache"))}
    cmd = [sys.executable, "-m", "tune_sota.cli", "search", "--space", args.space, "--results", str(tmp), *extra]
    t0 = time.time()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if run.returncode:
        sys.exit(f"search failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")

    from tune_sota import load_confirm, load_trials

    folder = tmp / args.space
    trials, confirm = load_trials(folder), load_confirm(folder)
    result = yaml.safe_load((folder / "best.yaml").read_text())["result"]
    stopped = trials[trials.status == "stopped"]
    shares = (stopped.epochs_run / stopped.epochs).round(2).value_counts().sort_index()
    w, b = result["winner"], result["baseline"]

    def pm(mean, std):
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"

    rows = [["winner (trial " + result["trial_id"] + ")", len(w["seeds"]), w["epochs"],
             pm(w["accuracy_mean"], w["accuracy_std"]), pm(w["tta_mean"], w["tta_std"])],
            ["baseline: chapter 7's plain recipe", len(b["seeds"]), b["epochs"],
             pm(b["accuracy_mean"], b["accuracy_std"]), pm(b["tta_mean"], b["tta_std"])]]
    body = table(["confirmed on val/", "seeds", "epochs", "accuracy", "with TTA"], rows)
    counts = ", ".join(f"{n} {s}" for s, n in trials.status.value_counts().items())
    body += (f"\n\n- wall time {wall / 60:.1f} min for {len(trials)} trials ({counts}) and {len(confirm)} "
             f"confirmation runs; trial-time {trials.time_s.sum() / 60:.1f} min searching, "
             f"{confirm.time_s.sum() / 60:.1f} min confirming")
    body += ("\n- ASHA stops by share of schedule reached: " +
             (", ".join(f"{n} at {s:.0%}" for s, n in shares.items()) or "none"))
    body += (f"\n- winner's holdout accuracy during the search {result['selection_accuracy']:.4f}; "
             f"gain {result['gain_points']:+.1f} points plain, {result['gain_tta_points']:+.1f} with TTA")
    best = yaml.safe_load((folder / "best.yaml").read_text())
    searched = yaml.safe_load((folder / "run.yaml").read_text())["searched"]
    body += "\n- winning config: " + ", ".join(f"{k}={best[k]}" for k in searched)
    summary = run.stdout[run.stdout.index(f"tune-sota: {args.space} done"):].strip()
    body += "\n\nThe search's own summary:\n\n```\n" + summary + "\n```"
    print(body)
    if not args.no_record:
        record(f"search_figures: the {args.space} space end to end", body)


if __name__ == "__main__":
    main()
