"""The cached data path (`pipeline: cached`): every image decoded once into a uint8 array per split,
shared on disk by all the trials of a node, and batches gathered from it in one indexing op and
augmented as whole batches (on the GPU when there is one), the way airbench and FFCV feed a model.

A cache is a folder under `cache_dir()/decoded`, named for the source folder, the presize and a
hash of (source path, presize, every image's path, size and mtime): change a file and the next run
decodes into a new folder. Each split is decoded only when a run needs it (a search that selects on
a holdout never opens val/ until its confirmation runs) into `SPLIT.npy` (N x 3 x presize x presize
uint8, memory-mapped when read, so the trials of a node share one copy in the page cache),
`SPLIT_labels.npy` and `SPLIT.json` (the class list, what was skipped), in the folder `SPLIT/`. One
process builds a split under a file lock; the others wait and then read it. The split's folder is
renamed into place once finished, so a reader never sees half a split, and never replaced (`build`).

It stays a fastai `DataLoaders` of `TfmdDL`s feeding a fastai `Learner`, so MixUp, label smoothing,
progressive resizing (`data.set_train_size`) and `Learner.tta` work as on fastai's own pipeline.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import CategoryMap, IntToFloatTensor, Normalize
from fastai.torch_core import TensorCategory, TensorMultiCategory
from fastai.vision.augment import RandomResizedCropGPU
from fastai.vision.core import TensorImage
from PIL import Image

from tune_sota import data, sources
from tune_sota.config import Config, UserError, write_atomic

VERSION = 3  # bump when the layout or the decoding changes: old caches are then never read
SPLITS = sources.SPLITS
# The dataset lives on the GPU when it takes at most this share of the trial's part of the GPU (its
# Ray-assigned fraction of the total memory, and never more than this share of what is free): the
# rest is for the model and its activations. Each trial of several on one GPU decides alone, so the
# budget is its own slice, not the free memory it happens to see.
GPU_RESIDENT_SHARE = 0.2
log = logging.getLogger(__name__)


def fingerprint(root: Path) -> str:
    """A hash of every image file's path, size and modification time under `root`'s train/ and val/."""
    h = hashlib.sha256()
    for split in SPLITS:
        for dirpath, dirnames, filenames in os.walk(root / split):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if sources.is_image(p):
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(root: Path, presize: int) -> Path:
    """The cache folder of the image folder `root` decoded at `presize` pixels (it may not exist yet)."""
    root = Path(root).resolve()
    key = json.dumps({"version": VERSION, "source": str(root), "presize": presize, "files": fingerprint(root)})
    return sources.cache_dir() / "decoded" / f"{root.name}-{presize}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _built(folder: Path, split: str) -> bool:
    """Whether `split` is published in the cache `folder` (its folder is there: it came by one rename)."""
    return (folder / split / f"{split}.json").is_file()


def build(root: Path, presize: int, splits: tuple[str, ...] = SPLITS) -> Path:
    """The cache of `root` at `presize`, decoding the `splits` it lacks into it first.

    Safe where several hosts share the cache (a home folder on NFS) and the lock cannot be trusted: the
    lock only saves a second decode; a split is decoded into a temporary folder named for its builder's
    host and process, and published by renaming that folder into place, which fails if another builder
    published it first (ours is then dropped). A published split is never replaced: readers hold its
    arrays memory-mapped, and a file replaced under a map reads as ESTALE or SIGBUS on NFS.
    """
    folder = cache_path(root, presize)
    if all(_built(folder, s) for s in splits):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if the builder dies, so no stale locks
        missing = tuple(s for s in splits if not _built(folder, s))  # another may have built them
        if not missing:
            return folder
        _remove_abandoned(folder)
        root = Path(root).resolve()
        found = sources.scan(root, missing)  # the same files, classes and order as fastai's pipeline reads
        _check_space(folder, found, presize)
        for split in missing:
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f"{TMP}{os.getpid()}@{socket.gethostname()}."))
            try:
                meta = _decode_into(tmp, root, found, split, presize)
                write_atomic(tmp / f"{split}.json", json.dumps(meta, indent=1))
                if not _publish(tmp, folder / split):
                    log.info("%s of %s was published by another builder meanwhile; using it", split, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


TMP = ".tmp-"  # a split being decoded: .tmp-PID@HOST.RANDOM


def _publish(tmp: Path, target: Path) -> bool:
    """Rename the finished split folder `tmp` to `target`, unless a split is there already (renaming a
    folder onto a non-empty one fails, atomically, also on NFS): False when another builder won."""
    try:
        os.rename(tmp, target)
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and target.is_dir():
            return False
        raise


def _remove_abandoned(folder: Path) -> None:
    """Delete the temporary folders of builders proven dead: this host's, of a process that is gone. One of
    another host (or a process still alive, maybe building now) may be in use, and is left alone."""
    here = socket.gethostname()
    for left in folder.glob(f"{TMP}*"):
        pid, _, host = left.name[len(TMP):].rsplit(".", 1)[0].partition("@")
        if host == here and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_space(where: Path, found: sources.Scan, presize: int) -> None:
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
    im = sources.load_rgb(path)
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        im = im.crop((left, top, left + s, top + s))  # then resize, as fastai does (no pixels from outside)
    im = im.resize((presize, presize), Image.BILINEAR)
    return np.asarray(im).transpose(2, 0, 1)


def _decode_into(folder: Path, root: Path, found: sources.Scan, split: str, presize: int) -> dict:
    """Decode one split into `folder`; returns its metadata (classes, count, what was skipped)."""
    items = found.splits[split]
    log.info("decoding %d %s images of %s at %d px into %s (once per node)", len(items), split, root, presize,
             folder.parent)
    x = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.uint8,
                                  shape=(len(items), 3, presize, presize))

    def one(i) -> bool:
        try:
            x[i] = decode(items[i][0], presize)
            return True
        except Exception:  # a file whose header reads but whose pixels do not (truncated, corrupt)
            return False

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL decodes and resizes without the GIL
        ok = np.array(list(pool.map(one, range(len(items)))), dtype=bool)
    bad = [items[i][0] for i in np.flatnonzero(~ok)]
    unreadable = [p for p in found.unreadable if p.relative_to(root).parts[0] == split]  # skipped by the scan
    if len(bad) + len(unreadable) > sources.MOSTLY_UNREADABLE * (len(items) + len(unreadable)):
        raise UserError(f"data: {len(bad)} of {len(items)} images in {root / split} could not be decoded "
                        f"(first: {', '.join(p.name for p in bad[:3])}); fix or remove them")
    if bad:  # keep the decoded rows only, so that row i is still image i of the labels
        keep = np.flatnonzero(ok)
        np.save(folder / f"{split}.keep.npy", x[keep])
        del x
        os.replace(folder / f"{split}.keep.npy", folder / f"{split}.npy")
    else:
        x.flush()
        del x
    labels = np.array([y for _, y in items], dtype=np.int64)[ok]
    np.save(folder / f"{split}_labels.npy", labels)
    skipped = [str(p.relative_to(root)) for p in unreadable + bad]
    if skipped:
        log.warning("skipped %d %s image(s) that could not be read (first: %s)", len(skipped), split,
                    ", ".join(skipped[:3]))
    return {"version": VERSION, "source": str(root), "presize": presize, "classes": found.classes,
            "count": len(labels), "skipped": skipped}


class CachedImages:
    """One split of a cache as tensors (`x` uint8 N x 3 x H x W, `y` int64), or the `rows` of it that
    belong to this set (a holdout shares its split's arrays), with the `split_idx` that fastai's
    `TfmdDL` and `Learner.tta` read and switch."""

    n_inp = 1

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list[str], split_idx: int,
                 rows: torch.Tensor | None = None):
        self.x, self.y, self.vocab, self.split_idx = x, y, CategoryMap(classes, sort=False), split_idx
        self.rows = rows

    def __len__(self):
        return len(self.y) if self.rows is None else len(self.rows)

    def __getitem__(self, i):
        i = i if self.rows is None else self.rows[i]
        return TensorImage(self.x[i]), _target(self.y[i])

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
        self.rows = None if self.rows is None else self.rows.to(device)
        return self


def _target(y: torch.Tensor):
    """A class index, or a multi-label row of 0/1 (`as_multi_label`), as fastai's loss and metrics take it."""
    return TensorMultiCategory(y) if y.is_floating_point() else TensorCategory(y)


def as_multi_label(images: CachedImages, root: Path) -> CachedImages:
    """`images` of a multi-label split view with each label set (a class index) made a row of 0/1 per label."""
    delim, labels = sources.multi_label(root)
    hot = torch.from_numpy(sources.multi_hot(list(images.vocab), delim, labels))
    return CachedImages(images.x, hot[images.y], labels, images.split_idx, rows=images.rows)


def load_split(folder: Path, split: str, split_idx: int) -> CachedImages:
    """One decoded split of a built cache, memory-mapped (pages shared between processes)."""
    folder = folder / split
    classes = json.loads((folder / f"{split}.json").read_text())["classes"]
    # mode "c" (copy-on-write) maps the file writable, which torch.from_numpy wants, without copying it
    return CachedImages(torch.from_numpy(np.load(folder / f"{split}.npy", mmap_mode="c")),
                        torch.from_numpy(np.load(folder / f"{split}_labels.npy")), classes, split_idx=split_idx)


def load(folder: Path) -> tuple[CachedImages, CachedImages]:
    """A built cache's train and validation splits."""
    return load_split(folder, "train", 0), load_split(folder, "val", 1)


def load_holdout(folder: Path, share: float) -> tuple[CachedImages, CachedImages]:
    """The train split as (the rows trained on, the held-out rows): `sources.holdout_split` of its labels."""
    full = load_split(folder, "train", 0)
    kept, held = (torch.from_numpy(i) for i in sources.holdout_split(full.y.numpy(), share))
    return (CachedImages(full.x, full.y, list(full.vocab), 0, rows=kept),
            CachedImages(full.x, full.y, list(full.vocab), 1, rows=held))


class CachedDL(TfmdDL):
    """A fastai `TfmdDL` over `CachedImages` that gathers each batch in one indexing op (no per-item
    Python, no worker processes) and copies it to the device without blocking when it is not there."""

    def create_item(self, s):
        return 0 if s is None else s

    def create_batches(self, samps):
        idxs = torch.tensor(list(samps), dtype=torch.long)
        if idxs.device != self.dataset.x.device:  # the epoch's order onto the data's GPU once, not per batch,
            idxs = idxs.pin_memory().to(self.dataset.x.device, non_blocking=True)  # from pinned memory: no sync
        stop = len(idxs) - len(idxs) % self.bs if self.drop_last else len(idxs)
        for i in range(0, stop, self.bs):
            yield self.create_batch(idxs[i:i + self.bs])

    def do_batch(self, b):
        return self.create_batch(b)

    def create_batch(self, idxs):
        ds = self.dataset
        idxs = torch.as_tensor(idxs, dtype=torch.long, device=ds.x.device)
        if ds.rows is not None:
            idxs = ds.rows[idxs]
        x, y = ds.x[idxs], ds.y[idxs]
        if self.device is not None and self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return TensorImage(x), _target(y)


class RandomResizedCropFlip(RandomResizedCropGPU):
    """fastai's `RandomResizedCropGPU`, except that every image gets its own crop and (with `flip`)
    its own coin for a horizontal flip, both done in one `grid_sample` of the whole batch; fastai's
    draws one crop for the batch and flips with a second full-size resampling. Validation resizes the
    whole image to `size`. Being a `RandomResizedCropGPU`, `data.set_train_size` changes its size."""

    def __init__(self, size, min_scale: float = 0.35, flip: bool = True, flip_vert: bool = False, **kwargs):
        super().__init__(size, min_scale=min_scale, **kwargs)
        self.flip, self.flip_vert = flip, flip and flip_vert  # fastai's: flip_vert only adds to a flip

    def before_call(self, b, split_idx):
        self.do, self.train = True, split_idx != 1

    def encodes(self, x: TensorImage):
        if not self.train:
            if tuple(x.shape[-2:]) == tuple(self.size):
                return x
            return TensorImage(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))
        # Drawn where the batch is, in fp32: no per-batch copies from the host (each would wait for the GPU)
        n, dev = x.shape[0], x.device
        area = torch.empty(n, device=dev).uniform_(self.min_scale, self.max_scale)
        log_ratio = torch.empty(n, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w = (area * log_ratio.exp()).sqrt().clamp(max=1)  # crop width and height as shares of the image's
        h = (area / log_ratio.exp()).sqrt().clamp(max=1)
        cx = (1 - w) * torch.empty(n, device=dev).uniform_(-1, 1)  # crop centre, so that the crop stays inside
        cy = (1 - h) * torch.empty(n, device=dev).uniform_(-1, 1)
        if self.flip:  # a mirrored crop is the same crop read right to left
            w = w * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        # The crop is axis-aligned, so its sampling grid is an outer sum of two ramps: far cheaper on a
        # CPU than `F.affine_grid`'s batched matrix product.
        oh, ow = self.size
        u = torch.linspace(-1 + 1 / ow, 1 - 1 / ow, ow, device=dev)  # pixel centres (align_corners=False)
        v = torch.linspace(-1 + 1 / oh, 1 - 1 / oh, oh, device=dev)
        if self.flip_vert:  # fastai's Dihedral: a vertical flip, and a transpose, each on its own coin
            h = h * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        w, h, cx, cy = (t[:, None, None] for t in (w, h, cx, cy))
        gx, gy = (w * u + cx).expand(n, oh, ow), (h * v[:, None] + cy).expand(n, oh, ow)
        if self.flip_vert and oh == ow:  # transposed: output row i reads the crop's column i
            t = (torch.rand(n, device=dev) < 0.5)[:, None, None]
            gx, gy = torch.where(t, (w * v[:, None] + cx).expand(n, oh, ow), gx), \
                torch.where(t, (h * u + cy).expand(n, oh, ow), gy)
        grid = torch.stack((gx, gy), -1)
        # Sampled in fp32 whatever the images' dtype: grid_sample turns the grid into pixel coordinates in
        # the input's dtype, which in bf16 puts a sample up to half a pixel off at 128 px (fp16: 1/30).
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return TensorImage(out.to(x.dtype))


def batch_tfms(cfg: Config, size: int, stats) -> list:
    """The cached path's batch augmentation at `size` (fresh objects for each DataLoader): with
    `augment: crop_flip`, a random-resized crop and flip per image, then Normalize (airbench's and
    FFCV's augmentation); with `augment: chapter7`, fastai's aug_transforms as the fastai pipeline runs them."""
    if cfg.augment == "chapter7":
        return data.batch_tfms(cfg, size, stats)
    return [IntToFloatTensor(), RandomResizedCropFlip(size, min_scale=cfg.min_scale, flip=cfg.flip,
                                                     flip_vert=cfg.flip_vert),
            Normalize.from_stats(*stats)]


def gpu_budget(total: int, free: int, fraction: float | None) -> int:
    """The bytes of decoded data a trial may keep on its GPU: a share of its `fraction` of the GPU's
    `total` memory (a whole GPU when None, as outside Ray), and never more than that share of what is `free`."""
    fraction = 1.0 if not fraction else min(1.0, fraction)
    return int(GPU_RESIDENT_SHARE * min(fraction * total, free))


def place(train: CachedImages, valid: CachedImages, device: torch.device,
          gpu_fraction: float | None = None) -> torch.device:
    """Move the decoded dataset onto a CUDA `device` when it fits in the trial's budget (`gpu_budget` of
    its `gpu_fraction`); return where it now lives."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, total = torch.cuda.mem_get_info(device)
    shared = train.x is valid.x  # a holdout: both sets index one array
    if train.x.nbytes + (0 if shared else valid.x.nbytes) > gpu_budget(total, free, gpu_fraction):
        return torch.device("cpu")  # batches are then gathered on the CPU and copied without blocking
    train.to(device)
    if shared:
        valid.x, valid.y = train.x, train.y
        valid.rows = None if valid.rows is None else valid.rows.to(device)
    else:
        valid.to(device)
    return device


def cached_dataloaders(cfg: Config, root: Path, *, device: torch.device,
                       gpu_fraction: float | None = None) -> DataLoaders:
    """DataLoaders over the decode-once cache of `root` at the config's presize, built if missing;
    `gpu_fraction`: the share of the GPU this run was given (None: all of it)."""
    if cfg.holdout:  # validate on a fixed share of train/; val/ is not decoded, not even opened
        train, valid = load_holdout(build(root, cfg.item_size, ("train",)), cfg.holdout)
    else:
        train, valid = load(build(root, cfg.item_size))
    if sources.multi_label(root) is not None:  # after the holdout: it is drawn per label set
        train, valid = as_multi_label(train, root), as_multi_label(valid, root)
    place(train, valid, device, gpu_fraction)
    dls = DataLoaders(CachedDL(train, bs=cfg.batch_size, shuffle=True, drop_last=True, num_workers=0),
                      CachedDL(valid, bs=cfg.batch_size, shuffle=False, num_workers=0),
                      path=root, device=device)
    dls = data.with_batch_tfms(cfg, dls, batch_tfms)
    return dls.to(device)  # the new batch transforms' statistics onto the device too
