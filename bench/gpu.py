"""gpu: chapter 7's model on a GPU node. (1) xresnet50 at 128 px, training images/s and GPU
utilization with each data pipeline in one process; (2) 1, 2 and 4 concurrent trials sharing the GPU
through the search (fractional GPUs, the node's CPUs split between them), total images/s.

    python bench/gpu.py --data /tmp/data/imagenette2-128     # on the GPU machine (see ../shared/gpu/README.md)

Images/s in (1) are training batches through forward, backward and the optimizer step (bf16,
channels_last), timed after a warm-up; utilization is nvidia-smi's, sampled every 200 ms over the same
window. In (2) each trial runs 3 epochs at the final size; a trial's rate is (train + valid images) /
its median epoch time after the first, and the total is the sum over the trials running together.
(0), first, is `tune-sota gpu-check` on the same data (tune_sota/gpucheck.py): the machine, short windows
of 1, 2 and 4 trials, the data-wait share, peak memory, and its advice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

from common import record, shared_data, table


class Utilization:
    """nvidia-smi's GPU utilization, sampled in the background while the block runs."""

    def __enter__(self):
        self.samples, self.proc = [], None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        except OSError:
            pass
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()

    @property
    def mean(self) -> str:
        return f"{sum(self.samples) / len(self.samples):.0f}%" if self.samples else "n/a"


def train_rate(cfg, batches: int, warmup: int) -> tuple[float, str]:
    """Training images/s of `cfg`'s learner over `batches` batches after `warmup`, and GPU utilization."""
    import torch
    from fastai.callback.core import Callback, CancelFitException

    from tune_sota import recipe

    class Clock(Callback):
        order = 100

        def before_fit(self):
            self.i, self.n, self.t0, self.util = 0, 0, None, Utilization()

        def after_batch(self):
            if not self.training:
                return
            self.i += 1
            if self.i == warmup:
                torch.cuda.synchronize()
                self.t0 = time.perf_counter()
                self.util.__enter__()
            elif self.i > warmup:
                self.n += len(self.xb[0])
            if self.i == warmup + batches:
                torch.cuda.synchronize()
                self.seconds = time.perf_counter() - self.t0
                self.util.__exit__()
                raise CancelFitException

    workers, device = recipe.resources(cfg, None)
    dls = recipe.make_dataloaders(cfg, workers=workers, device=device)
    learn = recipe.build_learner(cfg, dls)
    clock = Clock()
    learn.fit_one_cycle(1, cfg.lr, wd=cfg.wd, cbs=clock)
    return clock.n / clock.seconds, clock.util.mean


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("--bs", type=int, default=128, help="batch size")
    p.add_argument("--batches", type=int, default=40, help="batches timed in (1)")
    p.add_argument("--warmup", type=int, default=10, help="batches before the clock starts in (1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4], help="trials sharing the GPU in (2)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    root = shared_data(args.data)
    warnings.filterwarnings("ignore")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA GPU here; it measures the GPU machine (see ../shared/gpu/README.md)")
    tmp = tempfile.mkdtemp(prefix="tune_sota_bench_")
    os.environ["TUNE_SOTA_CACHE"] = os.path.join(tmp, "cache")

    from tune_sota import load_history, preflight, search
    from tune_sota.config import Config, parse_space

    values = dict(data=str(root), arch="xresnet50", size=128, batch_size=args.bs, lr=3e-3, epochs=3)
    from tune_sota import gpucheck

    check = gpucheck.report(gpucheck.run(parse_space({**values, "search": {}}, name="gpu-check")))
    print(check, flush=True)
    single, rates = [], {}
    try:
        for pipeline in ("fastai", "cached"):
            rate, util = train_rate(Config(**values, pipeline=pipeline), args.batches, args.warmup)
            rates[pipeline] = rate
            single.append([pipeline, rate, rate / rates["fastai"], util])
            print(single[-1], flush=True)

        together, cpus = [], os.cpu_count()
        found = preflight.scan(root)
        n_images = sum(len(v) for v in found.splits.values())  # what one epoch trains and validates on
        for k in args.concurrency:
            s = {"num_samples": k, "max_concurrent": k, "gpus_per_trial": round(1 / k, 4),
                 "cpus_per_trial": max(1, cpus // k), "scheduler": "fifo", "confirm_top": 0}
            space = parse_space({**values, "search": s}, name=f"gpu{k}")
            with Utilization() as util:
                outcome = search.run(space, results_root=os.path.join(tmp, "results"), out=lambda *_: None)
            h = load_history(outcome.results_dir)
            per_trial = h[h.epoch > 1].groupby("trial_id").epoch_s.median()  # epoch 1 includes start-up
            total = float((n_images / per_trial).sum())
            first = together[0][3] if together else total
            together.append([k, f"{1 / k:g}", s["cpus_per_trial"], total, total / first, util.mean,
                             f"{outcome.trials.accuracy.mean():.3f}"])
            print(together[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out = f"(0) tune-sota gpu-check on this data\n\n```\n{check}\n```\n\n(1) one process, training batches only\n\n"
    out += table(["pipeline", "train images/s", "x fastai", "GPU util"], single)
    out += "\n\n(2) concurrent trials through the search, each 3 epochs, cached pipeline\n\n"
    out += table(["trials", "GPU each", "CPUs each", "total images/s", "x 1 trial", "GPU util", "mean accuracy"],
                 together)
    out += (f"\n\n- xresnet50 at 128 px (presize 160), batch {args.bs}, bf16 + channels_last; {root.name}; "
            f"images/s in (2) count train + valid images per epoch")
    print(out)
    if not args.no_record:
        record("gpu: xresnet50 at 128 px on one GPU", out)


if __name__ == "__main__":
    main()
