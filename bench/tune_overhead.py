"""tune_overhead: what running trials through the search costs. N identical trials through
`tune_sota.search.run` (local Ray, ASHA, one trial at a time with every CPU) against the same N
trainings back to back in one process without Ray, each side ending with one TTA scoring as a search
does. Ratio = search wall / plain wall; the goal is at most 1.15x for trials of 30 s or more.

    python bench/tune_overhead.py                   # ../shared/data/imagenette2-128, 3 trials of 2 epochs

What the search adds: starting Ray and its workers, a checkpoint (model + optimizer) and a result
per epoch, the trial table, and scoring the best trial (in the driver process on local Ray). The
decode-once cache is built before either side is timed (trials on a node share it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings

from common import record, shared_data, table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("-n", "--trials", type=int, default=3, help="identical trials on each side")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25, help="xresnet18 channel-width multiplier")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    root = shared_data(args.data)
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="tune_sota_bench_")
    os.environ["TUNE_SOTA_CACHE"] = os.path.join(tmp, "cache")

    from tune_sota import cache, recipe, search
    from tune_sota.config import Config, parse_space

    cpus = os.cpu_count()
    values = dict(data=str(root), arch="xresnet18", width=args.width, size=args.size, epochs=args.epochs,
                  batch_size=64)
    cfg = Config(**values)
    try:
        cache.build(root, cfg.item_size)

        t0 = time.perf_counter()
        trial_s = []
        for _ in range(args.trials):
            t = time.perf_counter()
            learn = recipe.train(cfg, cpus=cpus)
            trial_s.append(time.perf_counter() - t)
        recipe.score(learn)
        plain = time.perf_counter() - t0
        print(f"plain: {plain:.1f} s ({', '.join(f'{s:.1f}' for s in trial_s)} s per training)", flush=True)
        del learn

        space = parse_space({**values, "search": {"num_samples": args.trials, "max_concurrent": 1,
                                                  "cpus_per_trial": cpus, "scheduler": "fifo", "confirm_top": 0}},
                            name="overhead")
        t0 = time.perf_counter()
        outcome = search.run(space, results_root=os.path.join(tmp, "results"), out=lambda *_: None)
        searched = time.perf_counter() - t0
        print(f"search: {searched:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    in_trial = outcome.trials.time_s.astype(float)
    rows = [["plain: recipe.train x N, then score", plain, sum(trial_s) / len(trial_s), 1.0],
            ["search: tune_sota.search.run", searched, in_trial.mean(), searched / plain]]
    out = table(["side", "wall s", "per trial s", "x plain"], rows)
    out += (f"\n\n- {args.trials} identical trials: xresnet18 width {args.width:g}, {args.size} px, {args.epochs} "
            f"epochs, batch 64, {cpus} CPUs each, one at a time; {root.name}, cached pipeline")
    out += ("\n- the search's 'per trial s' is Ray's time_total_s inside the trial; the rest of its wall is "
            "Ray start-up, scheduling, per-epoch checkpoints and results, the tables, and TTA scoring (in the "
            "driver process on local Ray, in a Ray task on a cluster)")
    out += f"\n\noverhead ratio: {searched / plain:.2f}x (search over plain; goal <= 1.15x for trials >= 30 s)"
    print(out)
    if not args.no_record:
        record("tune_overhead: N trials through the search vs back to back", out)


if __name__ == "__main__":
    main()
