"""What a `data:` value means, in one place: the offline digits (written once from scikit-learn's
bundled copy), the Imagenette/Imagewoof names fastai downloads, and local image folders with
train/ and val/; the scan of such a folder; the fixed holdout split of its train/ images.

Adding a dataset touches this module (and the README). Light imports only (fastai is imported when a
download is needed), so that the CLI's checks stay fast; the two pipelines (`data`, `cache`) only read
what this module prepares.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mimetypes
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tune_sota.config import UserError, write_atomic

# Each name `data:` accepts besides a folder and 'digits', with the name of fastai's `URLs` constant.
DOWNLOADS = {
    "imagenette2": "IMAGENETTE",
    "imagenette2-160": "IMAGENETTE_160",
    "imagenette2-320": "IMAGENETTE_320",
    "imagewoof2": "IMAGEWOOF",
    "imagewoof2-160": "IMAGEWOOF_160",
    "imagewoof2-320": "IMAGEWOOF_320",
}
DIGITS_PX = 64  # the 8x8 digits are upscaled so that presizing and random crops have pixels to work with
IMAGE_EXTS = {ext for ext, kind in mimetypes.types_map.items() if kind.startswith("image/")} | {".webp"}
MOSTLY_UNREADABLE = 0.5  # above this share of unreadable images a split is an error, below it they are skipped
SPLITS = ("train", "val")
log = logging.getLogger(__name__)
HOLDOUT_SEED = 0  # the holdout is a property of the data, not of a trial: the same in every run


def known(data: str) -> bool:
    """Whether `data` names a dataset this module can make or download (rather than a folder)."""
    return data == "digits" or data in DOWNLOADS


def cache_dir() -> Path:
    """Where prepared datasets live: $TUNE_SOTA_CACHE, else ~/.cache/tune_sota."""
    return Path(os.environ.get("TUNE_SOTA_CACHE") or Path.home() / ".cache" / "tune_sota")


def prepare_source(data: str) -> Path:
    """The image folder (with train/ and val/) for `data`, writing or downloading it if needed.

    An existing folder is not scanned here: reading every image header takes seconds for Imagenette,
    and both pipelines scan what they read (fastai's for its items, the cache when it decodes).
    """
    folder = Path(data).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if data == "digits":
        return digits_folder()
    if data not in DOWNLOADS:
        raise UserError(f"data: {folder.resolve()} is neither a folder nor a known dataset; use 'digits', one of "
                        f"{', '.join(DOWNLOADS)}, or a folder with train/ and val/ (one subfolder per class)")
    # Where an earlier download went, so that a search's driver finds it without importing fastai (and
    # torch with it: seconds at every start); fastai's own folder may be anywhere its config says.
    record = cache_dir() / "downloads" / f"{data}.path"
    if record.is_file() and (known := Path(record.read_text().strip())).is_dir():
        return known
    from fastai.data.external import URLs, untar_data

    # fastprogress draws its bar into any stdout; into a log file or a pipe it is stray block characters.
    shown = contextlib.nullcontext() if sys.stdout.isatty() else contextlib.redirect_stdout(io.StringIO())
    try:
        log.info("downloading %s with fastai's untar_data (once)", data)
        with shown:
            folder = Path(untar_data(getattr(URLs, DOWNLOADS[data])))
    except OSError as e:  # no network (URLError, socket errors and timeouts are OSErrors): the offline hint
        raise UserError(f"data: could not download {data} ({type(e).__name__}: {e}); without network, point "
                        f"data: at a local copy with train/ and val/ (in a space file a relative path is read "
                        f"from its folder), e.g. --set data=../shared/data/imagenette2-128") from None
    except Exception as e:  # anything else (fastai's config, a broken archive) says what it was, unhinted
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"data: could not download {data}: {type(e).__name__}: {first}") from None
    write_atomic(record, str(folder))
    return folder


def digits_folder() -> Path:
    """scikit-learn's bundled handwritten digits as an image folder, written once (offline, real)."""
    root = cache_dir() / f"digits-{DIGITS_PX}"
    if (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, _ = train_test_split(range(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    idx_train = set(idx_train)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".digits-"))
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = tmp / ("train" if i in idx_train else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((DIGITS_PX, DIGITS_PX), Image.BILINEAR)
        pixels.convert("RGB").save(folder / f"{i:04d}.png")
    try:  # publish atomically; a concurrent writer that won the race leaves us nothing to do
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_rgb(path) -> Image.Image:
    """Any image file as 8-bit RGB: grayscale, palette and CMYK converted, transparency on white,
    16-bit and 32-bit channels scaled down (PIL's own conversion would clip them to white)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
            im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        return im.convert("RGB")


def is_image(p: Path) -> bool:
    """Whether `p` is named like an image file (hidden files are not)."""
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


def scan(root: Path, splits: tuple[str, ...] = SPLITS) -> Scan:
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
    for split in splits:  # only the splits asked for are read: a search's trials never open val/
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




def holdout_split(labels, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices of `labels`: `share` of each class held out, at least one image of a
    class with two or more, always the same for the same labels (a fixed seed, not the trial's)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(HOLDOUT_SEED)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(len(idx) - 1, max(1, int(round(share * len(idx)))))
        held.append(rng.permutation(idx)[:n])
    held = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held
