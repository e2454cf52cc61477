"""trial_time: one whole trial (a narrow xresnet18 at 32 px for 3 epochs on the shared Imagenette) with
each data pipeline: wall time, seconds per epoch, accuracy plainly and with TTA, and the ratio.

    python bench/trial_time.py                      # ../shared/data/imagenette2-128, both pipelines

The trial is `recipe.train` as a search trial runs it (per-epoch validation included, Ray left out);
TTA scoring, which a search does only for its best trials, is timed apart. The cached path's one-off
cache build is timed apart too (a fresh temporary cache, removed afterwards): trials on a node share it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings

from common import record, shared_data, table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25, help="xresnet18 channel-width multiplier")
    p.add_argument("--cpus", type=float, default=None, help="CPUs the trial is given (default: all)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    root = shared_data(args.data)
    warnings.filterwarnings("ignore")
    tmp_cache = tempfile.mkdtemp(prefix="tune_sota_bench_")
    os.environ["TUNE_SOTA_CACHE"] = tmp_cache

    from tune_sota import cache, recipe
    from tune_sota.config import Config

    rows, wall = [], {}
    try:
        for pipeline in ("fastai", "cached"):
            cfg = Config(data=str(root), arch="xresnet18", width=args.width, size=args.size, epochs=args.epochs,
                         batch_size=64, pipeline=pipeline)
            if pipeline == "cached":
                t = time.perf_counter()
                folder = cache.build(root, cfg.item_size)
                build = time.perf_counter() - t
                counts = json.loads((folder / "meta.json").read_text())["counts"]
            epochs = []
            t = time.perf_counter()
            learn = recipe.train(cfg, cpus=args.cpus, on_epoch=lambda r, _, e=epochs: e.append(r.seconds))
            wall[pipeline] = time.perf_counter() - t
            t = time.perf_counter()
            scores = recipe.score(learn)
            score_s = time.perf_counter() - t
            rows.append([pipeline, wall[pipeline], " / ".join(f"{s:.1f}" for s in epochs), scores["accuracy"],
                         scores["tta_accuracy"], score_s])
            print(rows[-1], flush=True)
            del learn
    finally:
        shutil.rmtree(tmp_cache, ignore_errors=True)

    ratio = wall["fastai"] / wall["cached"]
    out = table(["pipeline", "trial s", "epoch s", "accuracy", "TTA accuracy", "TTA scoring s"], rows)
    out += (f"\n\n- xresnet18 width {args.width:g}, {args.size} px (presize {cfg.item_size}), {args.epochs} epochs, "
            f"batch 64, seed {cfg.seed}; {root.name}: {counts['train']} train, {counts['val']} val images")
    out += f"\n- cache build (once per node and presize, not in the trial time): {build:.1f} s"
    out += ("\n- the pipelines augment differently: fastai runs chapter 7's aug_transforms + one crop per batch, "
            "cached one crop + flip per image")
    out += (f"\n\ntrial time ratio: {ratio:.2f}x (fastai over cached); with the cache build counted: "
            f"{wall['fastai'] / (wall['cached'] + build):.2f}x")
    print(out)
    if not args.no_record:
        record("trial_time: one whole trial per pipeline", out)


if __name__ == "__main__":
    main()
