"""A model that travels, and predictions from it: `tune-sota export` and `tune-sota predict`.

An export folder holds
- `export.pkl`: a plain fastai `Learner` (fastai's `learn.export()`), opened with
  `fastai.learner.load_learner` where neither tune_sota nor the training data is: its DataLoaders are
  fastai's own (PILImage, Categorize, Resize to the presize, the model's crop at its size, Normalize),
  empty, so that `learn.predict(img)`, `learn.dls.test_dl(files)` and `learn.tta` work on new images;
- `model.pt2`: the model as a `torch.export` program, for serving without fastai: it takes float32
  images N x 3 x H x W (RGB in [0, 1], a centred square, any H = W) and returns class probabilities,
  resizing to the model's size and normalizing inside;
- `classes.json`: the class names (in the model's output order), the sizes and statistics, the config.

The training pipelines (`cache`, `data`) hold tune_sota classes; nothing of them is pickled: the
inference Learner is built afresh from fastai's pieces (`inference_learner`), and `export` checks the
pickle names no tune_sota module.
"""

from __future__ import annotations

import functools
import json
import logging
import pickletools
import shutil
import tempfile
from pathlib import Path

import torch
from fastai.data.block import CategoryBlock, DataBlock, MultiCategoryBlock
from fastai.data.transforms import IntToFloatTensor, Normalize, parent_label
from fastai.learner import Learner, load_learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat
from fastai.metrics import accuracy, accuracy_multi
from fastai.vision.augment import Dihedral, Flip, RandomResizedCropGPU, Resize
from fastai.vision.data import ImageBlock
from fasttransform import Pipeline
from PIL import Image

from tune_sota import data, sources
from tune_sota.config import Config, UserError, write_atomic

EXPORT_FILE = "export.pkl"
PROGRAM_FILE = "model.pt2"
CLASSES_FILE = "classes.json"
log = logging.getLogger(__name__)


def _stats(learn: Learner) -> tuple[list[float], list[float]]:
    """The mean and std the model was trained with, read from its validation pipeline's Normalize."""
    for tfm in learn.dls.valid.after_batch.fs:
        if isinstance(tfm, Normalize):
            return tfm.mean.flatten().tolist(), tfm.std.flatten().tolist()
    raise UserError("this model's pipeline has no Normalize; it cannot be exported")


def _batch_tfms(cfg: Config, stats, train: bool) -> list:
    """fastai's batch transforms for the exported Learner, in fastai's own classes. With chapter 7's
    augmentation they are the training pipeline's; with `crop_flip` validation only normalizes (the model
    resizes to its size first thing, as the cached pipeline did: `inference_learner`) and the training
    side, what `tta` augments with, flips and crops."""
    if cfg.pipeline == "fastai" or cfg.augment == "chapter7":
        return data.batch_tfms(cfg, cfg.size, stats)  # all fastai's own classes already
    if not train:
        return [IntToFloatTensor(), Normalize.from_stats(*stats)]
    flip = ([Dihedral()] if cfg.flip_vert else [Flip()]) if cfg.flip else []
    return [IntToFloatTensor(), *flip, RandomResizedCropGPU(cfg.item_size, min_scale=cfg.min_scale),
            Normalize.from_stats(*stats)]


def inference_learner(learn: Learner, cfg: Config, classes: list[str]) -> Learner:
    """A plain fastai Learner around `learn`'s model: empty DataLoaders of fastai's own pieces, no
    callbacks of tune_sota, a plain loss (for inference only)."""
    stats = _stats(learn)
    # multi-label: the blank item's one label as a list (str.splitlines: a builtin, so the pickle needs
    # nothing but fastai; no label holds a newline)
    y_block, get_y = (MultiCategoryBlock(vocab=list(classes)), Pipeline([parent_label, str.splitlines])) \
        if cfg.multi_label \
        else (CategoryBlock(vocab=list(classes)), parent_label)
    block = DataBlock(blocks=(ImageBlock, y_block), get_y=get_y, item_tfms=Resize(cfg.item_size))
    with tempfile.TemporaryDirectory() as tmp:  # fastai sets its pipelines up on one item: a blank image
        blank = Path(tmp) / str(classes[0]).replace("/", "_") / "blank.png"
        blank.parent.mkdir()
        Image.new("RGB", (cfg.item_size, cfg.item_size)).save(blank)
        dls = block.dataloaders([blank], bs=cfg.batch_size, device=learn.dls.device, num_workers=0)
        dls = dls.new_empty()  # the blank is no part of the model
    dls.train.after_batch = Pipeline(_batch_tfms(cfg, stats, train=True))
    dls.valid.after_batch = Pipeline(_batch_tfms(cfg, stats, train=False))
    dls.to(learn.dls.device)
    # The model resizes its input to `size` (bilinear, as the cached pipeline's validation does), in
    # torch's own Upsample: the Learner pickles with nothing of tune_sota, and any input size works.
    model = torch.nn.Sequential(torch.nn.Upsample(size=(cfg.size, cfg.size), mode="bilinear", align_corners=False),
                                learn.model.float().to(memory_format=torch.contiguous_format)).eval()
    if cfg.multi_label:  # learn.predict decodes every label above the threshold the search fitted
        out = Learner(dls, model, loss_func=BCEWithLogitsLossFlat(thresh=cfg.threshold),
                      metrics=functools.partial(accuracy_multi, thresh=cfg.threshold))
    else:
        out = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    out.logger = print  # fastai's default: a module function, pickled by reference
    return out


class Program(torch.nn.Module):
    """The model for serving: images in [0, 1] at any square size -> normalize -> the model (which
    resizes first: `inference_learner`) -> probabilities."""

    def __init__(self, model: torch.nn.Module, mean, std, multi_label: bool = False):
        super().__init__()
        self.model, self.multi_label = model, multi_label
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model((x - self.mean) / self.std)
        return out.sigmoid() if self.multi_label else out.softmax(dim=1)  # multi-label: each label on its own


def _classes(learn: Learner) -> list[str]:
    return [str(c) for c in learn.dls.valid.dataset.vocab]


def export(model_path, out) -> Path:
    """Write `export.pkl`, `model.pt2` and `classes.json` of the model at `model_path` (anything
    `tune_sota.load_model` accepts) into the new folder `out`."""
    from tune_sota.model import load_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; give a new folder (nothing is overwritten)")
    learn = load_model(model_path)
    # Written beside `out`, then renamed: an export cut short (a SIGTERM, a full disk) leaves no `out`
    # that looks whole, and `out` is free for the next try.
    partial = out.with_name(f"{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_learner(learn, learn.config, partial)
    if out.exists():
        out.rmdir()  # empty, as checked above
    partial.rename(out)
    log.info("exported to %s: %s (fastai load_learner), %s (torch.export.load), %s", out, EXPORT_FILE,
             PROGRAM_FILE, CLASSES_FILE)
    return out


def export_learner(learn: Learner, cfg: Config, out) -> Path:
    """Export a loaded model (`load_model`'s Learner and its config) into the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    learn.model.cpu()
    classes = _classes(learn)
    plain = inference_learner(learn, cfg, classes)
    plain.dls.cpu()
    plain.path = out
    plain.export(EXPORT_FILE)
    named = _tune_sota_names(out / EXPORT_FILE)
    if named:  # a pickle that needs tune_sota would not load where the model is meant to go
        (out / EXPORT_FILE).unlink()
        raise RuntimeError(f"export.pkl would need tune_sota to load ({', '.join(named[:3])}); this is a bug")
    mean, std = _stats(learn)
    program = Program(plain.model.cpu().eval(), mean, std, cfg.multi_label).eval()
    example = torch.rand(2, 3, cfg.item_size, cfg.item_size)
    side = torch.export.Dim("side", min=8, max=4096)
    exported = torch.export.export(program, (example,), dynamic_shapes={
        "x": {0: torch.export.Dim("batch", min=1, max=65536), 2: side, 3: side}})
    torch.export.save(exported, out / PROGRAM_FILE)
    write_atomic(out / CLASSES_FILE, json.dumps({
        "classes": classes, "size": cfg.size, "presize": cfg.item_size, "mean": mean, "std": std,
        "input": f"float32 N x 3 x H x W, RGB in [0, 1], a centred square (H = W; {cfg.item_size} px is what "
                 f"training saw), resized to {cfg.size} px inside",
        "output": ("N x classes probabilities, each label's own (sigmoid): a label is predicted above `threshold`"
                   if cfg.multi_label else "N x classes probabilities, in the order of `classes`"),
        **({"multi_label": True, "threshold": cfg.threshold, "metric": cfg.multi_metric} if cfg.multi_label else {}),
        "config": cfg.to_dict()}, indent=1) + "\n")
    return out


def _tune_sota_names(pkl: Path) -> list[str]:
    """The tune_sota modules a pickle refers to (torch.save writes a zip whose data.pkl is the pickle)."""
    import zipfile

    with zipfile.ZipFile(pkl) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        blob = z.read(name)
    return sorted({str(arg) for op, arg, _ in pickletools.genops(blob)
                   if isinstance(arg, str) and arg.startswith("tune_sota")})


def load(model_path) -> Learner:
    """A Learner for predictions: an export folder or `export.pkl` (fastai's `load_learner`, on the GPU
    when there is one), or anything `load_model` accepts (made into the same plain Learner)."""
    p = Path(model_path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist; give an export folder or export.pkl (tune-sota export), a best.yaml, "
                        f"a `tune-sota train --out` folder, or a search's trial folder")
    pkl = p / EXPORT_FILE if p.is_dir() else p
    if pkl.is_file() and pkl.suffix == ".pkl":
        cuda = torch.cuda.is_available()
        learn = load_learner(pkl, cpu=not cuda)
        if cuda:
            learn.model.cuda()
            learn.dls.cuda()
        return learn
    from tune_sota.model import load_model

    learn = load_model(p)
    device = learn.dls.device
    plain = inference_learner(learn, learn.config, _classes(learn))
    plain.model.to(device)
    return plain


def images(paths) -> list[Path]:
    """Image files named or inside the folders named (recursively, sorted); UserError for none."""
    found = []
    for p in map(lambda q: Path(q).expanduser(), paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and sources.is_image(f))
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{p} does not exist; give image files or folders of them")
    if not found:
        raise UserError(f"no images in {', '.join(map(str, paths))} ({', '.join(sorted(sources.IMAGE_EXTS)[:5])}, ...)")
    return found


def threshold(learn: Learner) -> float | None:
    """The threshold of a multi-label Learner (its loss decodes labels above it), None for single-label."""
    return float(learn.loss_func.thresh) if isinstance(learn.loss_func, BCEWithLogitsLossFlat) else None


def predict(learn: Learner, files: list[Path], *, tta: bool = False, top: int = 3, bs: int = 64):
    """(class probabilities N x C, class names) of `files`, batched on the Learner's device; `tta`
    averages fastai's test-time augmentation."""
    dl = learn.dls.test_dl(files, bs=bs, num_workers=0)
    with learn.no_bar(), learn.no_logging():
        probs = learn.tta(dl=dl)[0] if tta else learn.get_preds(dl=dl)[0]
    return probs.float().cpu(), [str(c) for c in learn.dls.vocab]
