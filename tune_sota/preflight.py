"""Checks that run before Ray starts, so that a mistake costs seconds and writes nothing: the data
folder's layout and images, the search settings against the space, GPUs, the cluster address.

Light imports only (no fastai, no Ray): `tune-sota` answers bad input at once.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tune_sota import cluster, pretrained, sources
from tune_sota.config import ARCHS, Config, Space, UserError, presize_of


def check_data(data: str, out=print) -> sources.Scan | None:
    """Check a `data:` value: a known dataset name, or a usable image folder or table (skipped files are
    said). Returns the folder's scan (None for a named dataset, which is made or downloaded later); a
    folder without val/ or a table is made into its split view first (links only: quick)."""
    if sources.known(data):
        return None
    spec = sources.parse_data(data)
    for path in sources.data_folders(data):
        if not path.exists() and spec.csv and path == Path(spec.csv).expanduser():
            raise UserError(f"data: csv {path.resolve()} does not exist; give a table of file names and labels")
        if not path.exists():
            raise UserError(f"data: {path.resolve()} is neither a folder nor a known dataset; use 'digits', one of "
                            f"{', '.join(sources.DOWNLOADS)}, a folder of images (one subfolder per class, with or "
                            f"without train/ and val/), or {{csv: labels.csv, folder: images}}")
    root = sources.prepare_source(data)
    found = sources.scan(root)
    if found.unreadable:
        out(f"tune-sota: data: skipping {len(found.unreadable)} unreadable image(s) in {root} "
            f"(first: {', '.join(str(p.relative_to(root)) for p in found.unreadable[:3])})")
    return found


def check_batches(found: sources.Scan, batch_size: int, holdout: float, where: str = "") -> None:
    """Training drops the last partial batch: fewer training images than one batch would train nothing."""
    labels = [y for _, y in found.splits["train"]]
    n = len(sources.holdout_split(labels, holdout)[0]) if holdout else len(labels)
    if batch_size > n:
        after = f" after holding out {holdout:.0%} for selection" if holdout else ""
        raise UserError(f"{where}batch_size {batch_size} but only {n} training images{after}, so not one batch "
                        f"would train; use batch_size {max(1, n // 2)} or less, or more images")


def source_px(data: str, found: sources.Scan | None, samples: int = 5) -> tuple[int, int] | None:
    """(the median short side of a few training images, how many were sampled), from their headers."""
    if found is None:
        return (sources.DIGITS_PX, 1) if data == "digits" else None  # downloads: not on disk yet
    train = [p for p, _ in found.splits.get("train", [])]
    sides = []
    for f in train[:: max(1, len(train) // samples)][:samples]:  # spread over the classes
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:
            continue
    return (sorted(sides)[len(sides) // 2], len(sides)) if sides else None


def check_presize(data: str, found: sources.Scan | None, item_size: int, out=print) -> None:
    """Warn when items are presized above the source images: scaled up, they cost decoding time and cache
    space and add no detail."""
    px = source_px(data, found)
    if px is not None and item_size > px[0]:
        out(f"tune-sota: warning: presize {item_size} px is above the source images' {px[0]} px (median short side "
            f"of {px[1]} sampled in {data}): images are scaled up and the decoded cache grows "
            f"{(item_size / px[0]) ** 2:.1f}x for no detail; set presize: {px[0]} (and size below it)")


def _item_sizes(space: Space) -> list[int]:
    """Every item (presize) size the space's trials can use."""
    sizes = []
    for presize in space.options("presize"):
        sizes += [presize] if presize else [presize_of(size) for size in space.options("size")
                                            if isinstance(size, int)] or [0]
    return sizes


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
    holdout = space.search.holdout if space.search.select_on == "holdout" else 0.0
    for d in space.options("data"):
        found = check_data(d, out)
        if found is not None:
            check_batches(found, max(space.options("batch_size")), holdout, f"{space.source}: ")
        check_presize(d, found, max(_item_sizes(space)), out)
    check_augmentations(space, out)
    check_gpus(space.search.gpus_per_trial, address)
    cluster.check_address(address)
    check_pretrained(space)  # last: it may download published weights (once, here, never in a trial)


LESSON3_KEYS = ("max_rotate", "max_zoom", "max_lighting", "max_warp", "p_affine", "p_lighting")


def check_augmentations(space: Space, out=print) -> None:
    """Lesson 3's affine and lighting keys act where fastai's aug_transforms run; on the cached pipeline
    with augment crop_flip (the defaults) they would do nothing, silently: say so once."""
    set_ = [k for k in LESSON3_KEYS if k in space.values]
    if set_ and "cached" in space.options("pipeline") and "crop_flip" in space.options("augment"):
        out(f"tune-sota: warning: {', '.join(set_)} act only where fastai's aug_transforms run; trials on the "
            f"cached pipeline with augment crop_flip (the defaults) crop and flip only and ignore them: set "
            f"augment: chapter7 (or pipeline: fastai) for them to count")


def check_pretrained(space) -> None:
    """Resolve every `pretrained:` value of a space once, before Ray starts: download published weights
    into the cache (or stop with one line), and check that files and models exist and fit their arch (the
    model built here once, so that weights of another model are one line, not an error in every trial)."""
    base = {**{k: v.args[0] for k, v in space.searched.items() if v.kind == "choice"}, **space.fixed_values()}
    for value in space.options("pretrained"):
        for arch in space.options("arch"):
            if value is True and arch in ARCHS:
                continue  # Config names this combination's mistake
            w = pretrained.resolve(value, arch, download=True)
            if w is not None and w.kind != "hub":
                from tune_sota import recipe  # torch and fastai: only for a search that starts from a file

                cfg = Config(**{**base, "arch": arch, "pretrained": value})
                try:
                    recipe.model_for(cfg, ["", " "])
                except UserError:
                    raise
                except Exception as e:  # timm's own loader: a file of another model
                    first = str(e).splitlines()[0][:300] if str(e) else ""
                    raise UserError(f"pretrained: {value} does not load into {arch}: {type(e).__name__}: {first}; "
                                    f"give weights of the same model") from None
