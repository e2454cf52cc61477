"""rung_placement: where in a one-cycle schedule can ASHA judge a trial without throwing away the
winner? Runs a space with no early stopping (`scheduler: fifo`, no confirmation), then for each share
of the schedule asks how well the holdout accuracy there predicts the final one: Spearman's rank
correlation over all trials, and whether the trials that end in the top 3 would survive a cut to the
top half (reduction factor 2) at that share. The default `search.grace` comes from this table.

    python bench/rung_placement.py                        # imagenette-cpu on ../shared/data, 16 trials
    python bench/rung_placement.py --space quick -n 10    # the offline digits

A share s is judged, as `ScheduleASHA` does, at each trial's first epoch at or past s of its schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
import warnings

import numpy as np
from common import record, shared_data, table

SHARES = (0.2, 0.25, 1 / 3, 0.5, 0.75)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="imagenette-cpu", help="search space (default: imagenette-cpu)")
    p.add_argument("--data", help="image folder for the space's data: (default: ../shared/data/imagenette2-128 "
                   "for imagenette-cpu, the space's own otherwise)")
    p.add_argument("-n", "--trials", type=int, default=16, help="trials to run to the end")
    p.add_argument("--seed", type=int, default=1, help="Optuna sampler seed (random sampling throughout)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    from tune_sota import search
    from tune_sota.config import load_space
    from tune_sota.results import load_history, load_trials

    space = load_space(args.space)
    if args.data or args.space == "imagenette-cpu":
        space.values["data"] = str(shared_data(args.data))
    space.search = dataclasses.replace(space.search, num_samples=args.trials, scheduler="fifo", searcher="random",
                                       seed=args.seed, confirm_top=0)
    tmp = tempfile.mkdtemp(prefix="tune_sota_rungs_")
    os.environ.setdefault("TUNE_SOTA_CACHE", os.path.join(tmp, "cache"))
    t0 = time.time()
    outcome = search.run(space, name="rungs", results_root=os.path.join(tmp, "results"),
                         command=f"bench/rung_placement.py --space {args.space}")
    wall = time.time() - t0
    trials, history = load_trials(outcome.results_dir), load_history(outcome.results_dir)
    done = trials[trials.status == "completed"].set_index("trial_id")
    final = done.accuracy
    top = set(final.sort_values(ascending=False).index[:3])

    rows = []
    for share in SHARES:
        at = {}
        for trial_id, h in history[history.trial_id.isin(done.index)].groupby("trial_id"):
            h = h.sort_values("epoch")
            judged = h[h.epoch / h.epochs + 1e-9 >= share].iloc[0]
            at[trial_id] = judged.accuracy
        at = final.index.map(at).to_numpy(dtype=float)
        rho = _spearman(at, final.to_numpy())
        cut = np.median(at)  # a cut to the top half (reduction factor 2) among all trials at once
        kept = {t for t, a in zip(final.index, at) if a >= cut}
        rows.append([f"{share:.0%}", f"{rho:.2f}", f"{len(top & kept)}/3", f"{np.mean(at):.3f}"])
    body = table(["rung at share of schedule", "Spearman vs final", "final top 3 kept by a top-half cut",
                  "mean accuracy there"], rows)
    body += (f"\n\n- space `{args.space}`, {len(done)} of {len(trials)} trials completed with no early stopping "
             f"(random sampling, seed {args.seed}), holdout accuracy; final accuracies "
             f"{final.min():.3f}-{final.max():.3f}; search wall {wall / 60:.1f} min")
    print(body)
    if not args.no_record:
        record("rung_placement: where ASHA may judge a one-cycle schedule", body)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


if __name__ == "__main__":
    main()
