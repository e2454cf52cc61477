"""Real searches to hold the simulator against (issue 16): the product's own search, with its shipped
decision settings, over the space of the recorded curves, and its chosen config's final model scored on
val/ exactly as the recorder scores every trial. `bench/simulate.py` puts these val/ accuracies beside the
distribution it simulates for the same settings (the section "Validation against real searches").

    python bench/validate_sim.py --searches 3            # seeds 101, 102, 103 (skips those already recorded)
    python bench/validate_sim.py --searches 3 --trials 12 --workers 2
    python bench/validate_sim.py --searches 2 --first-seed 301 --startup-trials 8   # a candidate default
    python bench/validate_sim.py --searches 3 --first-seed 401      # the defaults of issue 26 (epochs at the top)

Each search is `tune_sota.search.run` of `bench/curves/space.yaml` with the scheduler and searcher put
back to the product's defaults (`search.scheduler` asha, `search.searcher` tpe, grace, reduction factor
start-up trials and `search.epochs` as `SearchSettings` ships them, or `--startup-trials` for a candidate), `--trials`
trials `--workers` at once, and no confirmation (the simulator scores the choice, the best completed
trial on the holdout, and so does this). The rows go to `bench/curves/validation.csv`, one per search: the
seed, the choice's values and holdout accuracy, its val/ accuracy plainly and with TTA, the trial-seconds
(CPU) the search spent, and how many trials ASHA stopped. An interrupted search is resumed by running the
same command again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, command  # noqa: E402
from record_curves import SPACE, _final_state, _score  # noqa: E402

from tune_sota import results, runstate, search  # noqa: E402
from tune_sota.config import Config, SearchSettings, UserError, load_space, write_atomic  # noqa: E402

OUT = BENCH / "curves" / "validation.csv"
FIRST_SEED = 101  # apart from the recorder's chunk seeds (1, 2, ...)
log = logging.getLogger("validate_sim")


def real_space(seed: int, trials: int, workers: int, startup: int | None = None):
    """The curves' space under the product's shipped decision settings (`startup`: other start-up trials)."""
    d = SearchSettings()
    startup = d.startup_trials if startup is None else startup
    return load_space(str(SPACE), [f"search.scheduler={d.scheduler}", f"search.searcher={d.searcher}",
                                   f"search.grace={d.grace}", f"search.reduction_factor={d.reduction_factor}",
                                   f"search.startup_trials={startup}", f"search.seed={seed}",
                                   f"search.epochs={d.epochs}",
                                   f"search.final_size_rungs={str(d.final_size_rungs).lower()}",
                                   f"search.num_samples={trials}", f"search.max_concurrent={workers}",
                                   "search.confirm_top=0", f"search.keep_checkpoints={d.keep_checkpoints}"])


def one_search(seed: int, trials: int, workers: int, work: Path, startup: int | None = None) -> dict:
    """Run (or resume, or just read) one real search and score its choice on val/."""
    space = real_space(seed, trials, workers, startup)
    name = f"validate-{trials}x{workers}-seed{seed}"
    if space.search.startup_trials != SearchSettings().startup_trials:
        name += f"-startup{space.search.startup_trials}"
    if space.search.epochs != "searched":  # (the searches before issue 26 searched epochs, and kept the name)
        name += f"-epochs-{space.search.epochs}"
    rdir = work / name
    state = runstate.status(rdir)
    if state != runstate.FINISHED:
        search.run(space, name=name, results_root=work, resume=state is not None, command=command())
    trials_t, history = results.load_trials(rdir), results.load_history(rdir)
    done = trials_t[trials_t.status == results.COMPLETED].sort_values("accuracy", ascending=False)
    if done.empty:
        raise UserError(f"{name}: no trial completed; nothing to score")
    best = done.iloc[0]
    params = json.loads((Path(best.path) / "params.json").read_text())
    cfg = {k: v for k, v in params.items() if k in Config.__dataclass_fields__}
    state_file = _final_state(Path(best.path))
    if state_file is None:
        raise UserError(f"{name}: the chosen trial {best.trial_id} kept no checkpoint to score")
    s = _score({"trial_id": best.trial_id, "config": cfg, "state": str(state_file)})
    cpu = history.cpu_s if "cpu_s" in history else history.epoch_s
    d = space.search
    return {"searches": f"{trials}x{workers}", "seed": seed, "scheduler": d.scheduler, "grace": d.grace,
            "reduction_factor": d.reduction_factor, "searcher": d.searcher, "startup_trials": d.startup_trials,
            "final_size": bool(d.final_size_rungs), "epochs_mode": d.epochs, "trial_id": best.trial_id,
            **{k: cfg.get(k) for k in space.searched}, "holdout_accuracy": float(best.accuracy),
            "val_accuracy": s["val_accuracy"], "val_tta": s["val_tta"], "trial_cpu_s": float(cpu.sum()),
            "stopped": int((trials_t.status == "stopped").sum()), "trials": int(len(trials_t))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--searches", type=int, default=3, help="real searches, seeds from --first-seed (default 3)")
    ap.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"(default {FIRST_SEED})")
    ap.add_argument("--trials", type=int, default=12, help="trials per search (default 12, as imagenette-cpu)")
    ap.add_argument("--workers", type=int, default=2, help="trials at once (default 2)")
    ap.add_argument("--startup-trials", type=int, default=None,
                    help=f"Optuna's random start-up trials, a candidate default (default: the shipped "
                         f"{SearchSettings().startup_trials})")
    ap.add_argument("--work", default="results/validate", help="where the searches live (default results/validate)")
    ap.add_argument("--out", default=str(OUT), help=f"the table (default {OUT.relative_to(BENCH.parent)})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work, out = Path(args.work).resolve(), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(out, dtype={"resize": str}) if out.is_file() else pd.DataFrame()
    try:
        for seed in range(args.first_seed, args.first_seed + args.searches):
            key = f"{args.trials}x{args.workers}"
            d = SearchSettings()
            startup = d.startup_trials if args.startup_trials is None else args.startup_trials
            if len(table) and ((table.searches == key) & (table.seed == seed) & (table.grace == d.grace)
                               & (table.final_size == d.final_size_rungs)
                               & (table.startup_trials == startup)
                               & (table.get("epochs_mode", "searched") == d.epochs)).any():
                log.info("seed %d at %s with %d start-up trials: recorded already", seed, key, startup)
                continue
            row = one_search(seed, args.trials, args.workers, work, startup)
            log.info("seed %d: chose %s, holdout %.4f, val/ %.4f (TTA %.4f)", seed, row["trial_id"],
                     row["holdout_accuracy"], row["val_accuracy"], row["val_tta"])
            table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
            write_atomic(out, table.to_csv(index=False))
    except UserError as e:
        print(f"validate_sim: {e}", file=sys.stderr)
        return 2
    except runstate.SearchInterrupted as stopped:
        print(f"validate_sim: {stopped.outcome.name} interrupted; run the same command again to finish it",
              file=sys.stderr)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
