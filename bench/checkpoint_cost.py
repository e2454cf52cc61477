"""checkpoint_cost: the seconds a trial's checkpoints cost per epoch, for xresnet50 (Imagenette's 10
classes, 128 px) and for the proxy (xresnet18 at width 0.25, 32 px), when every epoch checkpoints
(before) and when only the rungs, the last epoch and every `search.checkpoint_every` epochs do (now).

    python bench/checkpoint_cost.py                       # storage: a temporary folder on this disk
    python bench/checkpoint_cost.py --storage /mnt/nfs/x  # where the search's --storage would be

One checkpoint is what a trial does at a checkpointed epoch: `recipe.save_state` (weights, Adam's two
buffers, random state) to bytes, written to a temporary folder, then copied into the storage folder
(what Ray's `tune.report(checkpoint=...)` does for a local --storage). Random weights and one optimizer
step on a random batch fill the buffers: no data is needed, and the size does not depend on the images.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

from common import record, table

MODELS = {"xresnet50 at 128 px": ("xresnet50", 1.0, 128), "proxy: xresnet18 x0.25 at 32 px": ("xresnet18", 0.25, 32)}


def learner_like(arch: str, width: float, size: int):
    """A model and a fastai Adam with filled buffers: what `recipe.save_state` reads of a Learner."""
    import torch
    from fastai.optimizer import Adam
    from fastai.vision.models import xresnet

    stem = (max(8, int(32 * width)), max(8, int(32 * width)), 64)  # as recipe.build_learner
    model = getattr(xresnet, arch)(n_out=10, widen=width, stem_szs=stem)
    opt = Adam(list(model.parameters()), lr=1e-3)
    model(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()
    return SimpleNamespace(model=model, opt=opt, dls=SimpleNamespace(loaders=[]))


def one_checkpoint(learn, storage: Path, n: int) -> tuple[float, int]:
    """Seconds and bytes of one checkpoint, as a trial makes it."""
    from tune_sota import recipe

    t0 = time.perf_counter()
    blob = recipe.save_state(learn, 1)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "state.pt").write_bytes(blob)
        shutil.copytree(d, storage / f"checkpoint_{n:06d}")
    return time.perf_counter() - t0, len(blob)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", help="folder to copy checkpoints into (default: a temporary one here)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the trial whose checkpoints are counted")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from tune_sota.config import SearchSettings
    from tune_sota.schedule import rung_shares
    from tune_sota.trainable import checkpoint_epochs

    torch.set_num_threads(1)
    s = SearchSettings()
    at = checkpoint_epochs(args.epochs, rung_shares(s.grace, s.reduction_factor), s.checkpoint_every)
    root = Path(args.storage) if args.storage else Path(tempfile.mkdtemp(prefix="ckpt-cost-"))
    rows = []
    try:
        for name, spec in MODELS.items():
            learn = learner_like(*spec)
            where = Path(tempfile.mkdtemp(dir=root))
            one_checkpoint(learn, where, 0)  # warm: first file-system touches
            timed = [one_checkpoint(learn, where, i + 1) for i in range(args.repeats)]
            shutil.rmtree(where, ignore_errors=True)
            secs, size = statistics.median(t for t, _ in timed), timed[0][1]
            before, now = secs, secs * len(at) / args.epochs
            rows.append([name, f"{size / 2**20:.1f} MB", f"{secs:.3f}", f"{before:.3f}", f"{now:.3f}",
                         f"{before / now:.1f}x"])
    finally:
        if not args.storage:
            shutil.rmtree(root, ignore_errors=True)
    body = (f"A trial of {args.epochs} epochs with the default settings (grace {s.grace}, reduction factor "
            f"{s.reduction_factor}, checkpoint_every {s.checkpoint_every}) checkpoints after epochs "
            f"{sorted(at)}: {len(at)} of {args.epochs}, where it checkpointed every epoch before. Storage: "
            f"{args.storage or 'a temporary folder on the local disk'}; median of {args.repeats}.\n\n"
            + table(["model", "checkpoint", "s per checkpoint", "s per epoch, before", "s per epoch, now",
                     "saved"], rows))
    print(body)
    if not args.no_record:
        record("checkpoint_cost: what a trial's checkpoints cost per epoch", body)


if __name__ == "__main__":
    main()
