"""fastai's own data pipeline (`pipeline: fastai`) and what both pipelines share: presized items,
chapter 7's batch augmentation, normalization, progressive resizing of the training batches. What a
`data:` value means (downloads, digits, folder scans, the holdout) is `sources`' job.

Train and validation get separate batch pipelines so that progressive resizing can change the
training size while validation (and TTA) always run at the final size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fastai.data.block import CategoryBlock, DataBlock, MultiCategoryBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import IndexSplitter, IntToFloatTensor, Normalize
from fastai.vision.augment import RandomResizedCropGPU, Resize, aug_transforms
from fastai.vision.core import PILImage, imagenet_stats
from fastai.vision.data import ImageBlock
from fasttransform import Pipeline

from tune_sota import sources
from tune_sota.config import Config


class RGBImage(PILImage):
    """fastai's PILImage, opened with `load_rgb` so that every kind of image file trains alike."""

    @classmethod
    def create(cls, fn, **kwargs):
        return cls(sources.load_rgb(fn)) if isinstance(fn, (str, Path)) else super().create(fn, **kwargs)


def augmentations(cfg: Config) -> list:
    """fastai's aug_transforms with the config's lesson-3 keys (flips, affine, lighting), without a crop:
    the random-resized crop that follows sets the size."""
    return aug_transforms(do_flip=cfg.flip, flip_vert=cfg.flip_vert, max_rotate=cfg.max_rotate,
                          max_zoom=cfg.max_zoom, max_lighting=cfg.max_lighting, max_warp=cfg.max_warp,
                          p_affine=cfg.p_affine, p_lighting=cfg.p_lighting, min_scale=1.0)


def batch_tfms(cfg: Config, size: int, stats) -> list:
    """Chapter 7's batch augmentation at `size`, then Normalize: fresh objects for each DataLoader."""
    crop = RandomResizedCropGPU(size, min_scale=cfg.min_scale)
    return [IntToFloatTensor(), *augmentations(cfg), crop, Normalize.from_stats(*stats)]


def set_train_size(dls: DataLoaders, size: int) -> None:
    """Switch the training batches to `size` pixels (progressive resizing)."""
    for tfm in dls.train.after_batch.fs:
        if isinstance(tfm, RandomResizedCropGPU):
            tfm.size = (size, size)


def normalization(cfg: Config, dls: DataLoaders):
    """Mean and std per channel: a pretrained model's own (`pretrained.stats`), ImageNet's, or measured on
    one training batch."""
    if cfg.pretrained is not False:
        from tune_sota import pretrained

        return pretrained.stats(cfg)
    if cfg.normalize == "imagenet":
        return imagenet_stats
    x = dls.train.one_batch()[0]
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


def stats_of(dls: DataLoaders) -> tuple[list[float], list[float]]:
    """The mean and std the validation batches are normalized with (ImageNet's if none)."""
    for tfm in dls.valid.after_batch.fs:
        if isinstance(tfm, Normalize):
            return tfm.mean.flatten().tolist(), tfm.std.flatten().tolist()
    return list(imagenet_stats[0]), list(imagenet_stats[1])


def fastai_dataloaders(cfg: Config, root: Path, *, workers: int, device: torch.device) -> DataLoaders:
    """fastai's default pipeline: PIL decode and presize per item, then augmentation per batch.
    With `cfg.holdout`, validation is the held-out share of train/ and val/ is not read at all."""
    if cfg.holdout:
        found = sources.scan(root, splits=("train",))  # readable images only: unreadable ones are skipped
        train = found.splits["train"]
        kept, held = sources.holdout_split([y for _, y in train], cfg.holdout)
        pairs, valid_idx = [train[i] for i in kept] + [train[i] for i in held], range(len(kept), len(train))
    else:
        found = sources.scan(root)
        pairs = found.splits["train"] + found.splits["val"]
        valid_idx = range(len(found.splits["train"]), len(pairs))
    items = [p for p, _ in pairs]
    labels = {p: found.classes[y] for p, y in pairs}
    multi = sources.multi_label(root)
    if multi is not None:  # each class folder is a set of labels (sources.split_view)
        delim, vocab = multi
        y_block, get_y = MultiCategoryBlock(vocab=vocab), lambda p: labels[p].split(delim)
    else:
        y_block, get_y = CategoryBlock(vocab=found.classes), lambda p: labels[p]
    block = DataBlock(
        blocks=(ImageBlock(cls=RGBImage), y_block),
        get_y=get_y,
        splitter=IndexSplitter(valid_idx),
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
