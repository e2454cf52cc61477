"""A smaller task from the shared Imagenette, for a second recorded table (issue 26): a share of each class's
train/ images (a fixed, seeded draw) and the whole val/, as a folder of symlinks (nothing copied, nothing
committed).

    python bench/subset.py --share 0.25 --out results/imagenette-quarter
    python bench/subset.py --classes 5 --seed 3 --share 1 --out results/imagenette-five   # the third task
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import shared_data  # noqa: E402


def make_subset(src: Path, out: Path, share: float, seed: int = 0, classes: int | None = None) -> dict[str, int]:
    """Symlink `share` of each class of `src/train` (at least one image) and all of `src/val` into `out`, for
    `classes` classes drawn with the seed (all if None); returns the train images per class. Idempotent: the
    same draw every time."""
    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    if classes is not None:
        names = sorted(rng.choice(names, size=classes, replace=False).tolist())
    counts = {}
    for split in ("train", "val"):
        for cls in (src / split / name for name in names):
            files = sorted(cls.iterdir())
            if split == "train":
                keep = max(1, round(share * len(files)))
                files = [files[i] for i in sorted(rng.choice(len(files), size=keep, replace=False))]
                counts[cls.name] = len(files)
            dest = out / split / cls.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = dest / f.name
                if not link.is_symlink():
                    link.symlink_to(f.resolve())
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--share", type=float, default=0.25, help="share of each class's train/ images (default 0.25)")
    ap.add_argument("--out", default="results/imagenette-quarter", help="the subset's folder (default %(default)s)")
    ap.add_argument("--data", help="the Imagenette to draw from (default ../shared/data/imagenette2-128)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    ap.add_argument("--classes", type=int, help="keep this many classes, drawn with the seed (default: all 10)")
    args = ap.parse_args(argv)
    if not 0 < args.share <= 1:
        sys.exit(f"subset.py: --share {args.share} must be in (0, 1], e.g. 0.25")
    if args.classes is not None and not 2 <= args.classes <= 10:
        sys.exit(f"subset.py: --classes {args.classes} must be 2 to 10, e.g. 5")
    counts = make_subset(shared_data(args.data), Path(args.out), args.share, args.seed, args.classes)
    print(f"{args.out}: train/ {sum(counts.values())} images ({min(counts.values())}-{max(counts.values())} "
          f"per class), val/ whole")
    return 0


if __name__ == "__main__":
    sys.exit(main())
