"""The decode-once cache and its DataLoaders, on image folders the tests make themselves."""

import json
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_image_folder, tiny
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage
from PIL import Image

from tune_sota import cache, data, sources
from tune_sota.config import Config, UserError


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "src", per_class=(5, 3), px=24)


def test_built_once_then_reused(folder):
    first = cache.build(folder, 20)
    stamp = (first / "train" / "train.npy").stat().st_mtime_ns
    again = cache.build(folder, 20)
    assert again == first and (again / "train" / "train.npy").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(first.name)] == [first.name]
    assert cache.build(folder, 16) != first  # another presize is another cache


def test_labels_pixels_and_class_order_are_the_folders(folder):
    train, valid = cache.load(cache.build(folder, 20))
    found = sources.scan(folder)
    assert list(train.vocab) == sorted(CLASSES) == found.classes
    for ds, split in ((train, "train"), (valid, "val")):
        files = found.splits[split]
        assert ds.x.shape == (len(files), 3, 20, 20) and ds.x.dtype == torch.uint8
        assert ds.y.tolist() == [y for _, y in files]
        assert all(p.parent.name == found.classes[y] for p, y in files)
        for i, (p, _) in enumerate(files):
            assert torch.equal(ds.x[i], torch.from_numpy(cache.decode(p, 20).copy()))
    fastai_dls = data.fastai_dataloaders(Config(**tiny(folder), pipeline="fastai"), folder, workers=0,
                                         device=torch.device("cpu"))
    assert list(fastai_dls.vocab) == list(train.vocab)


def test_rebuilt_when_a_source_image_changes(folder):
    before = cache.build(folder, 20)
    changed = sorted((folder / "val" / "red").iterdir())[0]
    Image.new("RGB", (24, 24), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    after = cache.build(folder, 20)
    assert after != before
    _, valid = cache.load(after)
    i = [p for p, _ in sources.scan(folder).splits["val"]].index(changed)
    assert valid.x[i, :, 0, 0].tolist() == [1, 2, 3]


def test_non_square_images_are_centre_cropped_like_fastai_resize(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in CLASSES[:2]:
            (tmp_path / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate([(40, 24), (24, 37)]):
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    train, _ = cache.load(cache.build(tmp_path, 16))
    assert train.x.shape == (4, 3, 16, 16)
    for i, (p, _) in enumerate(sources.scan(tmp_path).splits["train"]):
        want = np.asarray(Resize(16)(PILImage.create(p), split_idx=1)).transpose(2, 0, 1)
        assert np.array_equal(train.x[i].numpy(), want)


def _build_at_once(barrier, root, out):
    barrier.wait()  # both processes start building together
    out.put(str(cache.build(root, 20)))


def test_two_processes_build_one_cache(tmp_path):
    src = make_image_folder(tmp_path / "raced", per_class=(40, 10), px=48)
    ctx = multiprocessing.get_context("fork")  # separate processes, without re-importing fastai in each
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_at_once, args=(barrier, src, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert out.get() == out.get() == str(cache.cache_path(src, 20))
    built = [p.name for p in sources.cache_dir().joinpath("decoded").iterdir() if p.is_dir() and src.name in p.name]
    assert built == [cache.cache_path(src, 20).name]  # one cache, no half-built folder left behind
    train, valid = cache.load(cache.cache_path(src, 20))
    files = sources.scan(src).splits["val"]
    assert valid.y.tolist() == [y for _, y in files] and len(train) == 120
    assert all(torch.equal(valid.x[i], torch.from_numpy(cache.decode(p, 20).copy())) for i, (p, _) in enumerate(files))


def test_cached_dataloaders_augment_train_and_tta_but_not_validation(folder):
    cfg = Config(**tiny(folder, batch_size=4, resize="8>16"))
    dls = cache.cached_dataloaders(cfg, folder, device=torch.device("cpu"))
    assert dls.c == 3 and dls.n_inp == 1
    x, y = dls.train.one_batch()
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    data.set_train_size(dls, 16)
    assert dls.train.one_batch()[0].shape[-1] == 16 and dls.valid.one_batch()[0].shape[-1] == 16
    plain = torch.cat([b[0] for b in dls.valid])
    assert torch.equal(plain, torch.cat([b[0] for b in dls.valid]))  # validation is deterministic
    with dls.valid.dataset.set_split_idx(0):  # what Learner.tta does: training augmentation on valid
        augmented = torch.cat([b[0] for b in dls.valid])
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    assert dls.valid.dataset.split_idx == 1


def test_a_few_undecodable_images_are_skipped_and_mostly_undecodable_data_is_an_error(tmp_path):
    src = make_image_folder(tmp_path / "cut", per_class=(6, 3), px=24)
    cut = sorted((src / "train" / "green").iterdir())[:2]
    for f in cut:  # headers intact, pixel data cut off: passes the scan, fails to decode
        f.write_bytes(f.read_bytes()[:60])
    folder = cache.build(src, 20)
    train, valid = cache.load(folder)
    kept = [(p, y) for p, y in sources.scan(src).splits["train"] if p not in cut]
    assert train.y.tolist() == [y for _, y in kept] and len(valid) == 9
    assert all(torch.equal(train.x[i], torch.from_numpy(cache.decode(p, 20).copy())) for i, (p, _) in enumerate(kept))
    meta = json.loads((folder / "train" / "train.json").read_text())
    assert meta["count"] == 16 and json.loads((folder / "val" / "val.json").read_text())["count"] == 9
    assert sorted(meta["skipped"]) == [f"train/green/{f.name}" for f in cut]

    for f in (src / "val").rglob("*.png"):
        f.write_bytes(f.read_bytes()[:60])
    with pytest.raises(UserError, match=r"9 of 9 images in .*val could not be decoded"):
        cache.build(src, 20)
    again = cache.cache_path(src, 20)  # the val/ files changed: another cache, with no half-built split left
    assert not [p for p in again.iterdir() if p.name.startswith(".tmp")] and not (again / "val").exists()


@pytest.mark.parametrize("pipeline", ["cached", "fastai"])
def test_holdout_is_fixed_stratified_and_never_reads_val(tmp_path, pipeline):
    src = make_image_folder(tmp_path / "held", per_class=(10, 3), px=24)
    for f in (src / "val").rglob("*.png"):  # anything that opened val/ would fail on these
        f.write_bytes(b"not an image")
    cfg = Config(**tiny(src, batch_size=4, pipeline=pipeline, holdout=0.2))
    dls = [cfg_dls(cfg, src) for _ in range(2)]
    (held, kept), (held2, kept2) = ((_items(d.valid), _items(d.train)) for d in dls)
    assert held == held2 and kept == kept2, "the same holdout every time, whatever the seed"
    assert not set(held) & set(kept) and len(held) + len(kept) == 30
    labels = [y for _, y in sources.scan(src, ("train",)).splits["train"]]
    assert sorted(labels[i] for i in held) == [0, 0, 1, 1, 2, 2], "2 of each class's 10 held out"
    if pipeline == "cached":
        assert not (cache.cache_path(src, cfg.item_size) / "val").exists(), "val/ was not decoded"


def cfg_dls(cfg, src):
    from tune_sota import recipe

    return recipe.make_dataloaders(Config(**{**cfg.to_dict(), "seed": np.random.randint(1000)}), workers=0,
                                   device=torch.device("cpu"))


def _items(dl) -> list[int]:
    """The train/ indices (in the scan's order) of the images a DataLoader draws from."""
    ds = dl.dataset
    if isinstance(ds, cache.CachedImages):
        return sorted(ds.rows.tolist())
    scanned = [p for p, _ in sources.scan(Path(ds.items[0]).parents[2], ("train",)).splits["train"]]
    return sorted(scanned.index(p) for p in ds.items)


def test_chapter7_augmentation_on_cached_batches(folder):
    """`augment: chapter7` runs fastai's aug_transforms on the cached batches; progressive resizing still
    sets the crop, and validation stays deterministic at the final size."""
    from fastai.vision.augment import Brightness

    cfg = Config(**tiny(folder, batch_size=4, resize="8>16", augment="chapter7"))
    dls = cache.cached_dataloaders(cfg, folder, device=torch.device("cpu"))
    assert any(isinstance(t, Brightness) for t in dls.train.after_batch.fs)
    assert not any(isinstance(t, Brightness) for t in cache.cached_dataloaders(Config(**tiny(folder)), folder,
                                                                        device=torch.device("cpu")).train.after_batch.fs)
    assert dls.train.one_batch()[0].shape == (4, 3, 8, 8)
    data.set_train_size(dls, 16)
    assert dls.train.one_batch()[0].shape == (4, 3, 16, 16)
    plain = torch.cat([b[0] for b in dls.valid])
    assert plain.shape[-1] == 16 and torch.equal(plain, torch.cat([b[0] for b in dls.valid]))


def test_eight_trials_on_one_gpu_each_keep_to_their_slice():
    """Eight trials at 0.125 GPU each decide alone where their cache goes. Against a fifth of the free memory,
    each saw room for a 7.7 GB cache (100k images at 160 px) and together they placed 62 GB; against their
    own slice of the total, none does, and what they place never passes a fifth of the GPU."""
    gb = 2**30
    total = 141 * gb
    for cache_bytes, placed_by_all in ((int(7.7 * gb), False), (1 * gb, True)):
        free, placed = total - 2 * gb, 0
        for _ in range(8):
            budget = cache.gpu_budget(total, free, 0.125)
            assert budget <= cache.GPU_RESIDENT_SHARE * total / 8 + 1
            if cache_bytes <= budget:
                free, placed = free - cache_bytes, placed + cache_bytes
        assert placed <= cache.GPU_RESIDENT_SHARE * total and (placed == 8 * cache_bytes) is placed_by_all
    # a whole GPU (or no Ray) keeps the old budget, and what others use is never counted as free
    assert cache.gpu_budget(total, 100 * gb, None) == cache.gpu_budget(total, 100 * gb, 1.0) == int(0.2 * 100 * gb)


def test_two_builders_with_a_lock_that_does_nothing(tmp_path, monkeypatch):
    """NFS without working locks: two builders decode the same split at once. Neither deletes the other's
    temporary folder, the split is published once and never replaced under a reader's memory map, and only
    a temporary folder proven abandoned (this host's, of a dead process) is cleaned up."""
    import socket
    import threading

    src = make_image_folder(tmp_path / "nolock", per_class=(20, 5), px=24)
    monkeypatch.setattr(cache.fcntl, "flock", lambda *a: None)
    folder = cache.cache_path(src, 20)
    folder.mkdir(parents=True)
    dead = _dead_pid()
    abandoned = folder / f"{cache.TMP}{dead}@{socket.gethostname()}.abc123"
    elsewhere = folder / f"{cache.TMP}{os.getpid()}@another-host.abc123"  # maybe building there right now
    for d in (abandoned, elsewhere):
        d.mkdir()
    both, decode, tmps = threading.Barrier(2, timeout=60), cache._decode_into, []

    def decode_together(tmp, *args):
        tmps.append(tmp)
        meta = decode(tmp, *args)
        both.wait()  # both builders hold a decoded split; neither has published
        return meta

    monkeypatch.setattr(cache, "_decode_into", decode_together)
    out = []
    builders = [threading.Thread(target=lambda: out.append(cache.build(src, 20, ("train",)))) for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join(120)
    assert out == [folder, folder] and len(tmps) == 2
    published = (folder / "train").stat().st_ino
    assert not any(t.exists() for t in tmps), "each builder removed only its own temporary folder"
    assert not abandoned.exists() and elsewhere.exists()
    x = cache.load_split(folder, "train", 0).x  # a reader maps the split; a later build must not touch it
    monkeypatch.setattr(cache, "_decode_into", decode)
    assert cache.build(src, 20) == folder and (folder / "train").stat().st_ino == published
    assert x.shape[0] == 60 and torch.equal(x[0], torch.from_numpy(cache.decode(sources.scan(src).splits["train"][0][0],
                                                                              20).copy()))


def _dead_pid() -> int:
    """The id of a process that has ended."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
