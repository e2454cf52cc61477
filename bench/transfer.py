"""transfer: does a model trained here on five Imagenette classes help on the other five, with 50 training
images a class? Transfer against scratch at the same budget, a finetune-cpu search against fastai's
fine_tune defaults, and progressive resizing in this transfer ("Try it!", chapter 7), over seeds.

    python bench/transfer.py --prepare   # the symlink folders and the source model only (results/transfer/)
    python bench/transfer.py --seeds 5

Everything lands under results/transfer/ (never committed): source/ (the source model, a tune-sota
train --out folder), data-source/ and target/ (symlink folders into the shared Imagenette), the search's
results. Each figure is the val/ accuracy of the target's five classes (all of their val/ images), plain,
as a mean over seeds, and each comparison is a gain with its 95% Welch interval (tune_sota.uncertainty).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from common import ROOT, record, shared_data, table

WORK = ROOT / "results" / "transfer"
# A quarter-width xresnet18 at 32 px: what a 2-core CPU trains in seconds an epoch (search_spaces/quick.yaml)
MODEL = {"arch": "xresnet18", "width": 0.25, "size": 32, "presize": 40}


def link_folder(src: Path, dst: Path, classes: list[str], per_class: int | None) -> None:
    """train/ and val/ of `classes` as symlinks, train/ cut to the first `per_class` sorted images."""
    for split in ("train", "val"):
        for c in classes:
            files = sorted((src / split / c).iterdir())
            if split == "train" and per_class:
                files = files[:per_class]
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = dst / split / c / f.name
                if not link.exists():
                    link.symlink_to(f)


def prepare(data: Path, per_class: int, source_epochs: int, cpus: float) -> None:
    """The two symlink folders, then the source model (trained once, kept)."""
    classes = sorted(d.name for d in (data / "train").iterdir() if d.is_dir())
    source_classes, target_classes = classes[:5], classes[5:10]
    link_folder(data, WORK / "data-source", source_classes, None)
    link_folder(data, WORK / "target", target_classes, per_class)
    if (WORK / "source" / "state.pt").is_file():
        return
    config = WORK / "source.yaml"
    config.write_text("# the source model of bench/transfer.py: five Imagenette classes, from scratch\n"
                      + "".join(f"{k}: {v}\n" for k, v in {**MODEL, "data": str(WORK / "data-source"),
                                                           "epochs": source_epochs, "lr": 1.0e-2,
                                                           "batch_size": 64}.items()))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "tune_sota.cli", "train", "--config", str(config), "--out",
                    str(WORK / "source"), "--cpus", str(cpus)], check=True)
    print(f"source model trained in {time.time() - t0:.0f}s")


def runs(cfg_values: dict, seeds: list[int], cpus: float) -> tuple[list[float], float]:
    """Val/ accuracy of `cfg_values` trained once per seed; and the seconds they took."""
    from tune_sota import recipe
    from tune_sota.config import Config

    accs, t0 = [], time.time()
    for seed in seeds:
        learn = recipe.train(Config(**{**cfg_values, "seed": seed}), cpus=cpus)
        accs.append(recipe.score(learn, tta=False)["accuracy"])
    return accs, time.time() - t0


def search(cpus: float) -> dict:
    """A finetune-cpu search on the target (its own space file); the winner's config."""
    import yaml

    name = f"transfer-{int(time.time())}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "tune_sota.cli", "search", "--space", "finetune-cpu", "--name", name,
                    "--results", str(WORK / "searches"), "-q", "--set", f"data={WORK / 'target'}",
                    "--set", f"pretrained={WORK / 'source'}", "--set", "search.confirm_top=0"], check=True)
    best = yaml.safe_load((WORK / "searches" / name / "best.yaml").read_text())
    best.pop("result", None), best.pop("search", None), best.pop("baseline", None)
    print(f"search {name} took {time.time() - t0:.0f}s")
    return {**best, "search_s": time.time() - t0, "name": name}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("--per-class", type=int, default=50, help="target training images per class")
    p.add_argument("--source-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6, help="the budget of every target run (both phases)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--cpus", type=float, default=2)
    p.add_argument("--prepare", action="store_true", help="make the folders and the source model, then stop")
    p.add_argument("--no-search", action="store_true", help="skip the finetune-cpu search")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    data = shared_data(args.data)
    prepare(data, args.per_class, args.source_epochs, args.cpus)
    if args.prepare:
        return
    from tune_sota.uncertainty import gain, gain_line

    seeds = list(range(args.seeds))
    target = {**MODEL, "data": str(WORK / "target"), "epochs": args.epochs, "batch_size": 32}
    fine_tune = {**target, "pretrained": str(WORK / "source"), "lr": 2.0e-3, "freeze_epochs": 1, "lr_mult": 100.0}
    arms = {"scratch (chapter 7's recipe, lr 3e-3)": {**target},
            "fine_tune defaults (lr 2e-3, freeze 1, lr_mult 100)": fine_tune,
            "fine_tune defaults + resize 24>32": {**fine_tune, "resize": "24>32"}}
    found = None
    if not args.no_search:
        found = search(args.cpus)
        keep = {k: v for k, v in found.items() if k not in ("search_s", "name", "seed", "holdout")}
        arms["finetune-cpu search's winner"] = {**keep, "epochs": keep.get("epochs", args.epochs)}
    results = {}
    for label, values in arms.items():
        results[label] = runs(values, seeds, args.cpus)
        accs, secs = results[label]
        print(f"{label}: {100 * sum(accs) / len(accs):.1f}% over {len(accs)} seeds ({secs:.0f}s)", flush=True)
    import numpy as np

    rows = [[label, f"{100 * np.mean(a):.1f} ± {100 * np.std(a, ddof=1):.1f}",
             " ".join(f"{100 * x:.1f}" for x in a), f"{s / len(a):.0f}"] for label, (a, s) in results.items()]
    labels = list(results)
    lines = [f"- transfer over scratch: {gain_line(gain(results[labels[1]][0], results[labels[0]][0]))}",
             f"- progressive resizing 24>32 over none, fine_tune defaults: "
             f"{gain_line(gain(results[labels[2]][0], results[labels[1]][0]))}"]
    if found is not None:
        lines.append(f"- the search's winner over fine_tune defaults: "
                     f"{gain_line(gain(results[labels[3]][0], results[labels[1]][0]))}")
        lines.append(f"- the search's winner (transfer) over scratch: "
                     f"{gain_line(gain(results[labels[3]][0], results[labels[0]][0]))}")
        picked = {k: found.get(k) for k in ("epochs", "freeze_epochs", "lr", "lr_mult", "mom", "mixup",
                                            "label_smoothing", "resize")}
        lines.append(f"- the winner ({found['name']}, {found['search_s']:.0f}s, 12 trials on 80% of the 250 "
                     f"target images): {picked}")
    body = (f"Source: {MODEL} trained from scratch on Imagenette's first five classes (all train/ images, "
            f"{args.source_epochs} epochs). Target: the other five, {args.per_class} train/ images a class, "
            f"scored on all their val/ images; every target run {args.epochs} epochs unless the search chose "
            f"otherwise, seeds {seeds}. Measured under the shared lock (machine otherwise lightly used).\n\n"
            + table(["arm", "val accuracy % (mean ± std)", "per seed", "s per run"], rows) + "\n\n"
            + "\n".join(lines) + "\n")
    print(body)
    if not args.no_record:
        record("Fine-tuning: transfer from five Imagenette classes to the other five (bench/transfer.py)", body)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
