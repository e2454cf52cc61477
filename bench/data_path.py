"""data_path: images/s of training batches ready for the model (decoded, augmented, normalized, on the
device) from the cached path against fastai's default DataBlock pipeline, same data, same final sizes,
same batch size, in one run. The last line is `speedup: N.Nx`, cached over default at the first size.

    python bench/data_path.py                       # ../shared/data/imagenette2-128, batch 64, 64 and 128 px

A third row, the cached path with chapter 7's full batch augmentation (fastai's aug_transforms and its
per-batch crop, exactly what the default pipeline runs), separates what decoding once buys from what
the lighter crop-and-flip augmentation buys. The cache is built in a fresh temporary folder, so its
one-off cost is measured too, and removed afterwards.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import warnings

import torch
from common import record, shared_data, table


def images_per_s(dl, batches: int, warmup: int) -> float:
    """Steady-state images/s over `batches` batches after `warmup` (worker start-up excluded)."""
    n, t0 = 0, None
    for i, (x, _) in enumerate(dl):
        if i == warmup:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        elif i > warmup:
            n += len(x)
        if i == warmup + batches:
            break
    if x.is_cuda:
        torch.cuda.synchronize()
    if t0 is None:
        raise SystemExit(f"data_path: only {i + 1} batches per epoch; lower --batches or --warmup")
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="image folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="final image sizes; the first is the "
                   "speedup's")
    p.add_argument("--bs", type=int, default=64, help="batch size")
    p.add_argument("--batches", type=int, default=50, help="batches timed per row")
    p.add_argument("--warmup", type=int, default=5, help="batches before the clock starts")
    p.add_argument("--cpus", type=float, default=None, help="CPUs a trial is given (default: all)")
    p.add_argument("--workers", type=int, default=None, help="the default pipeline's DataLoader workers "
                   "(default: what a trial gets, CPUs - 1 on a CPU machine)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    root = shared_data(args.data)
    warnings.filterwarnings("ignore")
    tmp_cache = tempfile.mkdtemp(prefix="tune_sota_bench_")
    os.environ["TUNE_SOTA_CACHE"] = tmp_cache  # a fresh cache: its build is part of what is measured

    from tune_sota import cache, data, recipe
    from tune_sota.config import Config

    rows, rates, notes = [], {}, []
    try:
        for size in args.sizes:
            cfg = Config(data=str(root), size=size, batch_size=args.bs)
            workers, device = recipe.resources(cfg, args.cpus)
            workers = workers if args.workers is None else args.workers

            t = time.perf_counter()
            dls = data.fastai_dataloaders(cfg, root, workers=workers, device=device)
            setup = time.perf_counter() - t
            default = images_per_s(dls.train, args.batches, args.warmup)
            rows.append([f"fastai default DataBlock ({workers} worker{'s' * (workers != 1)})", size, default, 1.0,
                         setup])
            del dls
            gc.collect()

            t = time.perf_counter()
            cache.build(root, cfg.item_size)
            build = time.perf_counter() - t
            notes.append(f"cache build at presize {cfg.item_size}: {build:.1f} s, once per node and presize")
            t = time.perf_counter()
            dls = cache.cached_dataloaders(cfg, root, device=device)
            setup = time.perf_counter() - t
            rates[size] = images_per_s(dls.train, args.batches, args.warmup)
            rows.append(["cached: per-image crop + flip", size, rates[size], rates[size] / default, setup])

            data.with_batch_tfms(cfg, dls)  # fastai's chapter 7 batch transforms, as the default pipeline runs
            dls.to(device)
            full = images_per_s(dls.train, args.batches, args.warmup)
            rows.append(["cached + chapter 7 aug_transforms", size, full, full / default, "-"])
            rates[(size, "default")] = default
            del dls
            gc.collect()
    finally:
        shutil.rmtree(tmp_cache, ignore_errors=True)

    out = table(["pipeline", "px", "images/s", "x default", "setup s"], rows)
    out += "\n\n" + "\n".join(f"- {n}" for n in notes)
    out += (f"\n- batch {args.bs}, {args.batches} batches timed after {args.warmup}, torch threads "
            f"{torch.get_num_threads()}, device {device}; source JPEGs 128 px, presize = 1.25 x size")
    first = args.sizes[0]
    speedup = rates[first] / rates[(first, "default")]
    out += f"\n\nspeedup: {speedup:.1f}x (cached over default at {first} px)"
    print(out)
    if not args.no_record:
        record("data_path: images/s of ready training batches", out)
    print(f"speedup: {speedup:.1f}x")


if __name__ == "__main__":
    main()
