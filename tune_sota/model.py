"""The models a search and `tune-sota train` leave behind, and how to load them.

A model is a folder holding `state.pt` (the weights, as `recipe.save_state` writes them: tensors and
plain values, loaded with `torch.load(weights_only=True)`, never a pickled Learner) and the config that
rebuilds its Learner: `config.yaml` in a `tune-sota train --out` folder (with `scores.json`), or the
trial's `params.json` one level up in a search's `trial_*/checkpoint_*` folder. `load_model` takes
either, a trial folder (its newest checkpoint) or a `best.yaml` (its `checkpoint:`).

A finished search keeps only the checkpoints somebody may load (`prune`); `disk_usage` says what it keeps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

from tune_sota.config import Config, UserError, space_to_yaml, write_atomic
from tune_sota.saved import CONFIG_FILE, STATE_FILE, locate  # noqa: F401  (locate: load_model's, and callers')

log = logging.getLogger(__name__)

SCORES_FILE = "scores.json"


def default_out(config_path: Path) -> Path:
    """`model`, `model-2`... beside the config: a new folder, never one that exists."""
    parent, n = Path(config_path).resolve().parent, 1
    candidate = parent / "model"
    while candidate.exists():
        n += 1
        candidate = parent / f"model-{n}"
    return candidate


def save(learn, cfg: Config, folder: Path, scores: dict, **about) -> Path:
    """Write a trained model to the new folder `folder`: weights, the resolved config, the scores."""
    import torch

    folder = Path(folder)
    try:
        folder.mkdir(parents=True)  # never into an existing folder: a model is never overwritten
    except FileExistsError:
        raise UserError(f"--out {folder} exists; give a new folder (nothing is overwritten)") from None
    buf = io.BytesIO()  # the weights only: an optimizer state would double the file for nothing
    from tune_sota.recipe import about_model

    torch.save({"model": learn.model.state_dict(), "opt": None, "epoch": cfg.epochs, **about_model(learn)}, buf)
    (folder / STATE_FILE).write_bytes(buf.getvalue())
    header = f"# The config of this model; train it again: tune-sota train --config {folder / CONFIG_FILE}\n"
    write_atomic(folder / CONFIG_FILE, header + space_to_yaml(cfg.to_dict()))
    write_atomic(folder / SCORES_FILE, json.dumps({**scores, **about}, indent=1) + "\n")
    return folder


def load_model(path, *, cpus: float | None = None):
    """A trained fastai Learner, ready for `learn.predict`, `learn.tta` and `learn.validate`.

    `path`: a `tune-sota train --out` folder, a search's trial folder (its newest checkpoint) or
    checkpoint folder, or a best.yaml (its `checkpoint:`). The Learner is rebuilt from the config (the
    data must be where the config says) and the weights are loaded with `torch.load(weights_only=True)`.
    """
    from tune_sota import recipe

    state_file, cfg = locate(path)
    workers, device = recipe.resources(cfg, cpus)
    blob = state_file.read_bytes()
    # A fine-tuned model loads without the weights it started from (they may be gone): the same model
    # built empty, normalized with the statistics saved beside its weights.
    build = cfg if cfg.pretrained is False else dataclasses.replace(cfg, pretrained=False, freeze_epochs=0,
                                                                    normalize="imagenet")
    learn = recipe.build_learner(build, recipe.make_dataloaders(build, workers=workers, device=device))
    recipe.load_state(learn, blob)
    if build is not cfg:
        _set_stats(learn.dls, cfg, blob)
    learn.config = cfg  # what it was trained with, for the caller
    if cfg.pipeline == "cached":
        learn.dls.test_dl = _cached_test_dl(learn.dls, cfg)
    return learn


def _set_stats(dls, cfg: Config, blob: bytes) -> None:
    """Normalize `dls` with the statistics saved in `blob` (else those `pretrained.stats` names)."""
    import torch
    from fastai.data.transforms import Normalize

    saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True).get("stats")
    if not saved:
        from tune_sota import pretrained

        saved = pretrained.stats(cfg)
    new = Normalize.from_stats(*saved, cuda=False)
    for dl in (dls.train, dls.valid):
        for tfm in dl.after_batch.fs:
            if isinstance(tfm, Normalize):
                tfm.mean, tfm.std = new.mean.to(tfm.mean.device), new.std.to(tfm.std.device)


def _cached_test_dl(dls, cfg: Config):
    """`dls.test_dl` for the cached pipeline, whose DataLoaders read decoded arrays, not files: the items
    (image paths) are decoded as the cache decodes them, so `learn.predict` and `get_preds` take files."""
    import torch

    from tune_sota import cache

    vocab = list(dls.valid.dataset.vocab)

    def decode(o, full=True):  # (image, class name), as fastai's Datasets decodes an item for `predict`
        return o[0], vocab[int(o[1])]

    for dl in (dls.train, dls.valid):
        dl.dataset.decode = decode

    def test_dl(test_items, rm_type_tfms=None, with_labels=False, **kwargs):
        x = torch.stack([torch.from_numpy(cache.decode(Path(p), cfg.item_size).copy()) for p in test_items])
        items = cache.CachedImages(x, torch.zeros(len(x), dtype=torch.long), vocab, split_idx=1)
        items.decode = decode
        kwargs.pop("num_workers", None)  # batches are gathered in-process
        return dls.valid.new(items.to(dls.valid.dataset.x.device), **kwargs)

    return test_dl


def disk_usage(*folders) -> int:
    """Bytes of the files under `folders` (each file counted once)."""
    seen, total = set(), 0
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file() and not f.is_symlink() and f.resolve() not in seen:
                seen.add(f.resolve())
                total += f.stat().st_size
    return total


def prune(trial_dirs, keep) -> int:
    """Delete the checkpoints of every trial folder in `trial_dirs` that is not in `keep`; returns bytes freed."""
    keep = {Path(k).resolve() for k in keep}
    freed = 0
    for d in map(Path, trial_dirs):
        if d.resolve() in keep or not d.is_dir():
            continue
        for ckpt in d.glob("checkpoint_*"):
            freed += disk_usage(ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    return freed


def human(n: float) -> str:
    """Bytes as `12.3 MB`."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
