"""Checks that run before Ray starts, so that a mistake costs seconds and writes nothing: the data
folder's layout and images, the search settings against the space, GPUs, the cluster address.

Light imports only (no fastai, no Ray): `tune-sota` answers bad input at once.
"""

from __future__ import annotations

import mimetypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tune_sota import cluster
from tune_sota.config import Config, Dist, Space, UserError

DOWNLOADS = ("imagenette2", "imagenette2-160", "imagenette2-320", "imagewoof2", "imagewoof2-160", "imagewoof2-320")
IMAGE_EXTS = {ext for ext, kind in mimetypes.types_map.items() if kind.startswith("image/")} | {".webp"}
MOSTLY_UNREADABLE = 0.5  # above this share of unreadable images a split is an error, below it they are skipped


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def readable(p: Path) -> bool:
    """Whether PIL recognises the file as an image (a header check: cheap enough for every file)."""
    try:
        with Image.open(p) as im:
            im.size  # noqa: B018  (reading the header is the check)
        return True
    except Exception:
        return False


@dataclass
class Scan:
    """The images of one image-folder dataset: class names and (path, class index) per split."""

    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    unreadable: list[Path] = field(default_factory=list)


def scan(root: Path) -> Scan:
    """List and check an image folder (train/ and val/, one subfolder per class); UserError if unusable."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data: {root} has no {split}/ folder; it needs train/ and val/, each with one "
                            f"folder per class")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"data: {root / 'train'} has {len(classes)} class folder(s); a classifier needs at "
                        f"least 2 (one subfolder of images per class)")
    extra = sorted(d.name for d in (root / "val").iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise UserError(f"data: {root / 'val'} has classes that train/ lacks: {', '.join(extra[:5])}; "
                        f"val/ may only use train/'s classes")
    out = Scan(classes, {})
    for split in ("train", "val"):
        files, labels = [], []
        for i, c in enumerate(classes):
            found = sorted(p for p in (root / split / c).rglob("*") if p.is_file() and is_image(p)) \
                if (root / split / c).is_dir() else []
            if not found and split == "train":
                raise UserError(f"data: class folder {root / split / c} has no images "
                                f"({', '.join(sorted(IMAGE_EXTS & {'.jpg', '.jpeg', '.png'}))}, ...)")
            files += found
            labels += [i] * len(found)
        if not files:
            raise UserError(f"data: {root / split} has no images in its class folders")
        with ThreadPoolExecutor(8) as pool:
            ok = list(pool.map(readable, files))
        bad = [f for f, good in zip(files, ok) if not good]
        if len(bad) > MOSTLY_UNREADABLE * len(files):
            raise UserError(f"data: {len(bad)} of {len(files)} images in {root / split} are unreadable "
                            f"(first: {', '.join(p.name for p in bad[:3])}); fix or remove them")
        out.unreadable += bad
        out.splits[split] = [(f, y) for f, y, good in zip(files, labels, ok) if good]
    return out


def check_data(data: str, out=print) -> None:
    """Check a `data:` value: a known dataset name, or a usable image folder (skipped files are said)."""
    if data == "digits" or data in DOWNLOADS:
        return
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data: {data} is neither a folder nor a known dataset; use 'digits', one of "
                        f"{', '.join(DOWNLOADS)}, or a folder with train/ and val/ (one subfolder per class)")
    found = scan(root)
    if found.unreadable:
        out(f"tune-sota: data: skipping {len(found.unreadable)} unreadable image(s) in {root} "
            f"(first: {', '.join(str(p.relative_to(root)) for p in found.unreadable[:3])})")


def check_search(space: Space) -> None:
    """Search settings that cannot work with this space."""
    s, epochs = space.search, space.values.get("epochs", Config.epochs)
    most = max(epochs.args) if isinstance(epochs, Dist) else epochs
    if s.grace_period > most:
        raise UserError(f"{space.source}: search.grace_period {s.grace_period} is more than the most epochs a "
                        f"trial can have ({most}), so ASHA could never stop a trial; use 1..{most}")
    if s.score_top > s.num_samples:
        raise UserError(f"{space.source}: search.score_top {s.score_top} is more than num_samples "
                        f"{s.num_samples}; use at most {s.num_samples}")


def check_gpus(gpus_per_trial: float, address: str | None) -> None:
    """On local Ray, GPUs asked for must exist (a cluster is checked once joined)."""
    if gpus_per_trial <= 0 or address:
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise UserError(f"gpus_per_trial {gpus_per_trial:g} but this machine has no CUDA GPU; use "
                        f"--gpus-per-trial 0, or --address to join a cluster with GPUs")


def check(space: Space, address: str | None = None, out=print) -> None:
    """Every check that can run before Ray starts."""
    check_search(space)
    for d in space.options("data"):
        check_data(d, out)
    check_gpus(space.search.gpus_per_trial, address)
    cluster.check_address(address)
