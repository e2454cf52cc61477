"""The cached data path (`pipeline: cached`): every image decoded once into a uint8 array per split,
shared on disk by all the trials of a node, and batches gathered from it in one indexing op and
augmented as whole batches (on the GPU when there is one), the way airbench and FFCV feed a model.

A cache is a folder under `cache_dir()/decoded`, named for the source folder, the presize and a
hash of (source path, presize, every image's path, size and mtime): change a file and the next run
decodes into a new folder. Each holds `train.npy` and `val.npy` (N x 3 x presize x presize uint8,
memory-mapped when read, so the trials of a node share one copy in the page cache),
`train_labels.npy`, `val_labels.npy` and `meta.json` (the class list, what was skipped). One process
builds it under a file lock; the others wait and then read it. It is published by renaming a
finished temporary folder, so a reader never sees half a cache.

It stays a fastai `DataLoaders` of `TfmdDL`s feeding a fastai `Learner`, so MixUp, label smoothing,
progressive resizing (`data.set_train_size`) and `Learner.tta` work as on fastai's own pipeline.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import CategoryMap, IntToFloatTensor, Normalize
from fastai.torch_core import TensorCategory
from fastai.vision.augment import RandomResizedCropGPU
from fastai.vision.core import TensorImage
from PIL import Image

from tune_sota import data, preflight
from tune_sota.config import Config, UserError

VERSION = 1  # bump when the layout or the decoding changes: old caches are then never read
SPLITS = ("train", "val")
# The dataset lives on the GPU when it takes at most this share of the free GPU memory: the rest
# is for the model, its activations and the other trials that share the GPU.
GPU_RESIDENT_SHARE = 0.2


def fingerprint(root: Path) -> str:
    """A hash of every image file's path, size and modification time under `root`'s train/ and val/."""
    h = hashlib.sha256()
    for split in SPLITS:
        for dirpath, dirnames, filenames in os.walk(root / split):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if preflight.is_image(p):
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(root: Path, presize: int) -> Path:
    """The cache folder of the image folder `root` decoded at `presize` pixels (it may not exist yet)."""
    root = Path(root).resolve()
    key = json.dumps({"version": VERSION, "source": str(root), "presize": presize, "files": fingerprint(root)})
    return data.cache_dir() / "decoded" / f"{root.name}-{presize}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def build(root: Path, presize: int) -> Path:
    """The cache of `root` at `presize`, decoding every image into it first unless it is there already."""
    folder = cache_path(root, presize)
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if the builder dies, so no stale locks
        if (folder / "meta.json").is_file():  # another process built it while we waited
            return folder
        for left in folder.parent.glob(f".{folder.name}.tmp*"):  # a builder that died half-way
            shutil.rmtree(left, ignore_errors=True)
        root = Path(root).resolve()
        found = preflight.scan(root)  # the same files, classes and order as fastai's pipeline reads
        _check_space(folder.parent, found, presize)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
        try:
            _decode_into(tmp, root, found, presize)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _check_space(where: Path, found: preflight.Scan, presize: int) -> None:
    """Refuse to start a cache that the disk cannot hold, rather than fail half-way through it."""
    n = sum(len(v) for v in found.splits.values())
    need, free = n * 3 * presize * presize, shutil.disk_usage(where).free
    if need > 0.95 * free:
        raise UserError(f"data: decoding {n} images at {presize} px needs {need / 2**30:.1f} GiB but "
                        f"{where} has {free / 2**30:.1f} GiB free; set TUNE_SOTA_CACHE to a bigger disk, a "
                        f"smaller presize, or pipeline: fastai (no cache)")


def decode(path: Path, presize: int) -> np.ndarray:
    """One image as uint8 3 x presize x presize: its largest centred square, resized bilinearly
    (what fastai's `Resize(presize)` gives a validation image)."""
    im = data.load_rgb(path)
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        im = im.crop((left, top, left + s, top + s))  # then resize, as fastai does (no pixels from outside)
    im = im.resize((presize, presize), Image.BILINEAR)
    return np.asarray(im).transpose(2, 0, 1)


def _decode_into(folder: Path, root: Path, found: preflight.Scan, presize: int) -> None:
    skipped = list(found.unreadable)
    counts = {}
    for split in SPLITS:
        items = found.splits[split]
        print(f"tune-sota: decoding {len(items)} {split} images of {root} at {presize} px into {folder.parent} "
              f"(once per node)", flush=True)
        x = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.uint8,
                                      shape=(len(items), 3, presize, presize))

        def one(i, x=x, items=items) -> bool:
            try:
                x[i] = decode(items[i][0], presize)
                return True
            except Exception:  # a file whose header reads but whose pixels do not (truncated, corrupt)
                return False

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL decodes and resizes without the GIL
            ok = np.array(list(pool.map(one, range(len(items)))), dtype=bool)
        bad = [items[i][0] for i in np.flatnonzero(~ok)]
        unreadable = sum(p.relative_to(root).parts[0] == split for p in found.unreadable)  # skipped by the scan
        if len(bad) + unreadable > preflight.MOSTLY_UNREADABLE * (len(items) + unreadable):
            raise UserError(f"data: {len(bad)} of {len(items)} images in {root / split} could not be decoded "
                            f"(first: {', '.join(p.name for p in bad[:3])}); fix or remove them")
        if bad:  # keep the decoded rows only, so that row i is still image i of the labels
            keep = np.flatnonzero(ok)
            np.save(folder / f"{split}.keep.npy", x[keep])
            del x
            os.replace(folder / f"{split}.keep.npy", folder / f"{split}.npy")
            skipped += bad
        else:
            x.flush()
            del x
        labels = np.array([y for _, y in items], dtype=np.int64)[ok]
        np.save(folder / f"{split}_labels.npy", labels)
        counts[split] = len(labels)
    meta = {"version": VERSION, "source": str(root), "presize": presize, "classes": found.classes,
            "counts": counts, "skipped": [str(p.relative_to(root)) for p in skipped]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    if skipped:
        print(f"tune-sota: skipped {len(skipped)} image(s) that could not be read "
              f"(first: {', '.join(meta['skipped'][:3])})", flush=True)


class CachedImages:
    """One split of a cache as tensors (`x` uint8 N x 3 x H x W, `y` int64), with the `split_idx`
    that fastai's `TfmdDL` and `Learner.tta` read and switch."""

    n_inp = 1

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list[str], split_idx: int):
        self.x, self.y, self.vocab, self.split_idx = x, y, CategoryMap(classes, sort=False), split_idx

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return TensorImage(self.x[i]), TensorCategory(self.y[i])

    @property
    def c(self) -> int:
        return len(self.vocab)

    @contextlib.contextmanager
    def set_split_idx(self, i: int):
        """Transforms run as for split `i` inside the block (`tta` augments validation images this way)."""
        old, self.split_idx = self.split_idx, i
        try:
            yield self
        finally:
            self.split_idx = old

    def to(self, device: torch.device) -> CachedImages:
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self


def load(folder: Path) -> tuple[CachedImages, CachedImages]:
    """A built cache's train and validation splits, memory-mapped (pages shared between processes)."""
    classes = json.loads((folder / "meta.json").read_text())["classes"]
    # mode "c" (copy-on-write) maps the file writable, which torch.from_numpy wants, without copying it
    return tuple(CachedImages(torch.from_numpy(np.load(folder / f"{s}.npy", mmap_mode="c")),
                              torch.from_numpy(np.load(folder / f"{s}_labels.npy")), classes, split_idx=i)
                 for i, s in enumerate(SPLITS))


class CachedDL(TfmdDL):
    """A fastai `TfmdDL` over `CachedImages` that gathers each batch in one indexing op (no per-item
    Python, no worker processes) and copies it to the device without blocking when it is not there."""

    def create_item(self, s):
        return 0 if s is None else s

    def create_batches(self, samps):
        idxs = torch.tensor(list(samps), dtype=torch.long)
        stop = len(idxs) - len(idxs) % self.bs if self.drop_last else len(idxs)
        for i in range(0, stop, self.bs):
            yield self.create_batch(idxs[i:i + self.bs])

    def do_batch(self, b):
        return self.create_batch(b)

    def create_batch(self, idxs):
        ds = self.dataset
        idxs = torch.as_tensor(idxs, dtype=torch.long, device=ds.x.device)
        x, y = ds.x[idxs], ds.y[idxs]
        if self.device is not None and self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return TensorImage(x), TensorCategory(y)


class RandomResizedCropFlip(RandomResizedCropGPU):
    """fastai's `RandomResizedCropGPU`, except that every image gets its own crop and (with `flip`)
    its own coin for a horizontal flip, both done in one `grid_sample` of the whole batch; fastai's
    draws one crop for the batch and flips with a second full-size resampling. Validation resizes the
    whole image to `size`. Being a `RandomResizedCropGPU`, `data.set_train_size` changes its size."""

    def __init__(self, size, min_scale: float = 0.35, flip: bool = True, **kwargs):
        super().__init__(size, min_scale=min_scale, **kwargs)
        self.flip = flip

    def before_call(self, b, split_idx):
        self.do, self.train = True, split_idx != 1

    def encodes(self, x: TensorImage):
        if not self.train:
            if tuple(x.shape[-2:]) == tuple(self.size):
                return x
            return TensorImage(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))
        n = x.shape[0]
        area = torch.empty(n).uniform_(self.min_scale, self.max_scale)
        log_ratio = torch.empty(n).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w = (area * log_ratio.exp()).sqrt().clamp(max=1)  # crop width and height as shares of the image's
        h = (area / log_ratio.exp()).sqrt().clamp(max=1)
        cx = (1 - w) * torch.empty(n).uniform_(-1, 1)  # crop centre, so that the crop stays inside
        cy = (1 - h) * torch.empty(n).uniform_(-1, 1)
        if self.flip:  # a mirrored crop is the same crop read right to left
            w = w * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        # The crop is axis-aligned, so its sampling grid is an outer sum of two ramps: far cheaper on a
        # CPU than `F.affine_grid`'s batched matrix product.
        (oh, ow), dev = self.size, x.device
        u = torch.linspace(-1 + 1 / ow, 1 - 1 / ow, ow, device=dev)  # pixel centres (align_corners=False)
        v = torch.linspace(-1 + 1 / oh, 1 - 1 / oh, oh, device=dev)
        w, h, cx, cy = (t.to(dev, x.dtype)[:, None, None] for t in (w, h, cx, cy))
        grid = torch.stack(((w * u + cx).expand(n, oh, ow), (h * v[:, None] + cy).expand(n, oh, ow)), -1)
        return TensorImage(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False))


def batch_tfms(cfg: Config, size: int, stats) -> list:
    """The cached path's batch augmentation at `size`: a random-resized crop and flip per image, then
    Normalize (the crop and flip of airbench and FFCV; fresh objects for each DataLoader)."""
    return [IntToFloatTensor(), RandomResizedCropFlip(size, min_scale=cfg.min_scale, flip=cfg.flip),
            Normalize.from_stats(*stats)]


def place(train: CachedImages, valid: CachedImages, device: torch.device) -> torch.device:
    """Move the decoded dataset onto a CUDA `device` when it fits; return where it now lives."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    if train.x.nbytes + valid.x.nbytes > GPU_RESIDENT_SHARE * free:
        return torch.device("cpu")  # batches are then gathered on the CPU and copied without blocking
    train.to(device), valid.to(device)
    return device


def cached_dataloaders(cfg: Config, root: Path, *, device: torch.device) -> DataLoaders:
    """DataLoaders over the decode-once cache of `root` at the config's presize, built if missing."""
    train, valid = load(build(root, cfg.item_size))
    place(train, valid, device)
    dls = DataLoaders(CachedDL(train, bs=cfg.batch_size, shuffle=True, drop_last=True, num_workers=0),
                      CachedDL(valid, bs=cfg.batch_size, shuffle=False, num_workers=0),
                      path=root, device=device)
    dls = data.with_batch_tfms(cfg, dls, batch_tfms)
    return dls.to(device)  # the new batch transforms' statistics onto the device too
