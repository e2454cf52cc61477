"""data_wait: the share of a trial's training time spent waiting for the next batch (data loading and
augmentation) against the time in the batches (forward, backward, optimizer), for each data pipeline.
The performance goal is at most 5%.

    python bench/data_wait.py                      # ../shared/data/imagenette2-128, the proxy model
    python bench/data_wait.py --arch xresnet50 --width 1 --size 128 --batch 64    # the GPU space's model

Each pipeline trains in this process (no Ray) for a window of --seconds after a warm-up, measured by
`tune_sota.gpucheck`'s meter, the one `tune-sota gpu-check` uses: the wait is the wall time from the end of
one training batch to the start of the next; validation is left out. On a GPU the window's ends are
synchronized. The cached path's one-off cache build is timed apart (a fresh temporary cache, removed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from common import record, shared_data, table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("--arch", default="xresnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per pipeline")
    p.add_argument("--warmup", type=int, default=3, help="training batches before the window")
    p.add_argument("--cpus", type=float, default=None, help="CPUs the trial is given (default: all)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    root = shared_data(args.data)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="tune_sota_bench_"))
    os.environ["TUNE_SOTA_CACHE"] = str(tmp / "cache")

    from tune_sota import cache, gpucheck, recipe
    from tune_sota.config import Config

    rows = []
    try:
        for pipeline in ("cached", "fastai"):
            cfg = Config(data=str(root), arch=args.arch, width=args.width, size=args.size, batch_size=args.batch,
                         epochs=1000, pipeline=pipeline)
            build = ""
            if pipeline == "cached":
                t = time.perf_counter()
                cache.build(root, cfg.item_size)
                build = f"{time.perf_counter() - t:.0f}"
            workers, device = recipe.resources(cfg, args.cpus)
            learn = recipe.build_learner(cfg, recipe.make_dataloaders(cfg, workers=workers, device=device))
            barrier = tmp / f"barrier-{pipeline}"
            barrier.mkdir()
            meter = gpucheck.meter(args.warmup, args.seconds, barrier, 1)
            recipe.fit(learn, cfg, [recipe.ProgressiveResize(cfg), meter])
            rows.append([pipeline, workers, meter.images / meter.seconds, f"{meter.wait / meter.seconds:.1%}",
                         f"{1 - meter.wait / meter.seconds:.1%}", build or "-"])
            print(rows[-1], flush=True)
            del learn
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = table(["pipeline", "workers", "train images/s", "waiting for data", "in the batches", "cache build s"], rows)
    out += (f"\n\n- {args.arch} width {args.width:g} at {args.size} px (presize {cfg.item_size}), batch {args.batch}, "
            f"{device}; {root.name}; a {args.seconds:g} s window after {args.warmup} warm-up batches")
    print(out)
    if not args.no_record:
        record("data_wait: the share of training time spent waiting for data", out)


if __name__ == "__main__":
    main()
