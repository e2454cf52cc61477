"""Data sources (the offline digits, Imagenette downloads, local image folders) and the DataLoaders
a trial trains on: presized items, batch augmentation, normalization.

Train and validation get separate batch pipelines so that progressive resizing can change the
training size while validation (and TTA) always run at the final size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.external import URLs, untar_data
from fastai.data.transforms import IndexSplitter, IntToFloatTensor, Normalize
from fastai.vision.augment import RandomResizedCropGPU, Resize, aug_transforms
from fastai.vision.core import PILImage, imagenet_stats
from fastai.vision.data import ImageBlock
from fasttransform import Pipeline
from PIL import Image

from tune_sota import preflight
from tune_sota.config import Config, UserError

DOWNLOADS = {  # fastai's download of each name that `data:` accepts (see preflight.DOWNLOADS)
    "imagenette2": URLs.IMAGENETTE,
    "imagenette2-160": URLs.IMAGENETTE_160,
    "imagenette2-320": URLs.IMAGENETTE_320,
    "imagewoof2": URLs.IMAGEWOOF,
    "imagewoof2-160": URLs.IMAGEWOOF_160,
    "imagewoof2-320": URLs.IMAGEWOOF_320,
}
DIGITS_PX = 64  # the 8x8 digits are upscaled so that presizing and random crops have pixels to work with


def cache_dir() -> Path:
    """Where prepared datasets live: $TUNE_SOTA_CACHE, else ~/.cache/tune_sota."""
    return Path(os.environ.get("TUNE_SOTA_CACHE") or Path.home() / ".cache" / "tune_sota")


def prepare_source(data: str) -> Path:
    """The image folder (with train/ and val/) for `data`, writing or downloading it if needed.

    An existing folder is not scanned here: reading every image header takes seconds for Imagenette,
    and both pipelines scan what they read (fastai's for its items, the cache when it decodes).
    """
    if not Path(data).expanduser().is_dir():
        preflight.check_data(data, out=lambda *_: None)  # a known name, or one line saying what is wrong
    if data == "digits":
        return digits_folder()
    if data in DOWNLOADS:
        try:
            return Path(untar_data(DOWNLOADS[data]))
        except Exception as e:  # any network failure: the fix is the same
            raise UserError(
                f"data: could not download {data} ({type(e).__name__}); without network, point data: at a "
                f"local copy, e.g. data: ../shared/data/imagenette2-128"
            ) from None
    return Path(data).expanduser().resolve()


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


class RGBImage(PILImage):
    """fastai's PILImage, opened with `load_rgb` so that every kind of image file trains alike."""

    @classmethod
    def create(cls, fn, **kwargs):
        return cls(load_rgb(fn)) if isinstance(fn, (str, Path)) else super().create(fn, **kwargs)


def batch_tfms(cfg: Config, size: int, stats) -> list:
    """Chapter 7's batch augmentation at `size`, then Normalize: fresh objects for each DataLoader."""
    augs = aug_transforms(do_flip=cfg.flip, min_scale=1.0)  # affine + lighting; the crop sets the size
    crop = RandomResizedCropGPU(size, min_scale=cfg.min_scale)
    return [IntToFloatTensor(), *augs, crop, Normalize.from_stats(*stats)]


def set_train_size(dls: DataLoaders, size: int) -> None:
    """Switch the training batches to `size` pixels (progressive resizing)."""
    for tfm in dls.train.after_batch.fs:
        if isinstance(tfm, RandomResizedCropGPU):
            tfm.size = (size, size)


def normalization(cfg: Config, dls: DataLoaders):
    """Mean and std per channel: ImageNet's, or measured on one training batch."""
    if cfg.normalize == "imagenet":
        return imagenet_stats
    x = dls.train.one_batch()[0]
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


def fastai_dataloaders(cfg: Config, root: Path, *, workers: int, device: torch.device) -> DataLoaders:
    """fastai's default pipeline: PIL decode and presize per item, then augmentation per batch."""
    found = preflight.scan(root)  # readable images only: unreadable ones are skipped, not fatal
    items = [p for split in ("train", "val") for p, _ in found.splits[split]]
    labels = {p: found.classes[y] for split in ("train", "val") for p, y in found.splits[split]}
    block = DataBlock(
        blocks=(ImageBlock(cls=RGBImage), CategoryBlock(vocab=found.classes)),
        get_y=lambda p: labels[p],
        splitter=IndexSplitter(range(len(found.splits["train"]), len(items))),
        item_tfms=Resize(cfg.item_size),
    )
    dls = block.dataloaders(items, bs=cfg.batch_size, num_workers=workers, device=device,
                            persistent_workers=workers > 0)
    return with_batch_tfms(cfg, dls)


def with_batch_tfms(cfg: Config, dls: DataLoaders, tfms=batch_tfms) -> DataLoaders:
    """Give train and validation their own augmentation pipelines (`tfms(cfg, size, stats)`), validation
    at the final size."""
    stats = normalization(cfg, dls)
    dls.train.after_batch = Pipeline(tfms(cfg, cfg.stages[0][0], stats))
    dls.valid.after_batch = Pipeline(tfms(cfg, cfg.size, stats))
    return dls
