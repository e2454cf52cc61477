"""Chapter 7's recipe: build a fastai Learner for a `Config`, fit it with one-cycle, progressive
resizing, MixUp and label smoothing, and score it plainly and with TTA. Never imports Ray: the Tune
trainable wraps `train`, and `tune-sota train` calls it directly.
"""

from __future__ import annotations

import io
import math
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (patches Learner.to_channelslast)
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision  # noqa: F401  (patches Learner.to_bf16 / to_fp16)
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.imports import noop  # the one ProgressCallback compares the logger with
from fastai.learner import Learner, Recorder
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.models import xresnet
from fastcore.foundation import L

from tune_sota import cache, data, sources
from tune_sota.config import Config, plain
from tune_sota.results import EpochReport
from tune_sota.schedule import size_at_epoch

OnEpoch = Callable[[EpochReport, Learner], None]


class ProgressiveResize(Callback):
    """Sets the training image size for each epoch from the config's stages."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def before_epoch(self):
        self.learn.train_size = size_at_epoch(self.cfg.stages, self.n_epoch, self.epoch)
        data.set_train_size(self.dls, self.learn.train_size)


class EpochEnd(Callback):
    """Hands each finished epoch's figures to `on_epoch`; stops the fit at once on a NaN/inf loss."""

    order = Recorder.order + 1  # after the Recorder has computed the epoch's metrics

    def __init__(self, on_epoch: OnEpoch | None, start_epoch: int):
        self.on_epoch, self.start_epoch, self.diverged = on_epoch, start_epoch, False

    def before_epoch(self):
        self.t0 = time.perf_counter()

    def after_batch(self):
        if self.training and not math.isfinite(self.learn.loss.item()):
            self.diverged = True
            raise CancelFitException()

    def after_epoch(self):
        if self.epoch < self.start_epoch:  # skipped while resuming from a checkpoint
            return
        values = list(self.recorder.values[-1]) if self.recorder.values else []
        train_loss, valid_loss, acc = (values + [math.nan] * 3)[:3]
        report = EpochReport(
            epoch=self.epoch + 1, epochs=self.n_epoch, size=getattr(self.learn, "train_size", 0),
            train_loss=float(train_loss), valid_loss=float(valid_loss), accuracy=float(acc),
            epoch_s=time.perf_counter() - self.t0, diverged=self.diverged,
        )
        if self.on_epoch:
            self.on_epoch(report, self.learn)

    def after_cancel_fit(self):
        if self.diverged and self.on_epoch:  # after_epoch does not run once the fit is cancelled
            self.on_epoch(EpochReport(self.epoch + 1, self.n_epoch, getattr(self.learn, "train_size", 0),
                                      math.nan, math.nan, 0.0, time.perf_counter() - self.t0, True), self.learn)


def resources(cfg: Config, cpus: float | None) -> tuple[int, torch.device]:
    """Set torch's threads from the CPUs this run was given; return DataLoader workers and device."""
    n = max(1, int(cpus if cpus else os.cpu_count() or 1))
    torch.set_num_threads(n)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    workers = cfg.workers if cfg.workers >= 0 else (n if device.type == "cuda" else n - 1)
    return workers, device


def build_learner(cfg: Config, dls) -> Learner:
    """An xresnet from scratch with the config's loss, metrics and precision; quiet (no bars)."""
    arch = getattr(xresnet, cfg.arch)
    # The stem's last width is fixed by xresnet's first block, so only its first two convs narrow.
    stem = (max(8, int(32 * cfg.width)), max(8, int(32 * cfg.width)), 64)
    model = arch(n_out=dls.c, widen=cfg.width, stem_szs=stem)
    loss = LabelSmoothingCrossEntropyFlat(eps=cfg.label_smoothing) if cfg.label_smoothing else CrossEntropyLossFlat()
    learn = Learner(dls, model, loss_func=loss, metrics=accuracy, wd=cfg.wd)
    learn.remove_cb(ProgressCallback)  # bars and per-epoch tables flood logs; EpochEnd reports instead
    learn.logger = lambda *_: None
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if dls.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dls.device.type == "cuda":
        if precision == "bf16":
            learn.to_bf16()
        elif precision == "fp16":
            learn.to_fp16()
        learn.to_channelslast(use_amp=False)  # NHWC convolutions on tensor cores; precision is set above
    return learn


def make_dataloaders(cfg: Config, *, workers: int, device: torch.device, gpu_fraction: float | None = None):
    """The DataLoaders for `cfg`, preparing the data source first if needed; `gpu_fraction`: the share of
    the GPU this run was given (the cached pipeline sizes what it keeps on the GPU by it)."""
    root = sources.prepare_source(cfg.data)
    if cfg.pipeline == "cached":  # batches are gathered in-process from decoded memory: no workers to feed it
        return cache.cached_dataloaders(cfg, root, device=device, gpu_fraction=gpu_fraction)
    return data.fastai_dataloaders(cfg, root, workers=workers, device=device)


def train(cfg: Config, *, cpus: float | None = None, on_epoch: OnEpoch | None = None,
          checkpoint: bytes | None = None, progress: bool = False, gpus: float | None = None) -> Learner:
    """Train `cfg` from scratch, or on from a `checkpoint` made by `save_state`; returns the Learner.
    `progress`: fastai's bars within each epoch, for a person watching a terminal; `gpus`: the share of the
    GPU this run was given (a Ray trial's; None: all of it)."""
    set_seed(cfg.seed)
    workers, device = resources(cfg, cpus)
    dls = make_dataloaders(cfg, workers=workers, device=device, gpu_fraction=gpus)
    learn = build_learner(cfg, dls)
    start_epoch = 0
    if checkpoint is not None:
        start_epoch = load_state(learn, checkpoint)
    cbs = [ProgressiveResize(cfg), EpochEnd(on_epoch, start_epoch)]
    if cfg.mixup > 0:
        cbs.append(MixUp(cfg.mixup))
    if progress:
        learn.logger = noop  # bars only: the epoch's figures come from `on_epoch`, not fastai's table
        cbs.append(ProgressCallback())
    if start_epoch < cfg.epochs:
        learn.fit_one_cycle(cfg.epochs, cfg.lr, wd=cfg.wd, cbs=cbs, start_epoch=start_epoch)
    return learn


def score(learn: Learner, tta: bool = True) -> dict[str, float]:
    """Validation accuracy plainly and with test-time augmentation (fastai's `tta`)."""
    dl = learn.dls.valid
    out = {"accuracy": float(learn.validate(dl=dl)[1])}
    if tta:
        preds, targs = learn.tta(dl=dl)
        out["tta_accuracy"] = float(accuracy(preds, targs))
    return out


def save_state(learn: Learner, epochs_done: int) -> bytes:
    """Model, optimizer and random state after `epochs_done` epochs, as bytes (never a pickled Learner)."""
    buf = io.BytesIO()
    # Optimizer hyper-parameters hold numpy scalars (and fastcore's L): plain values load with weights_only.
    opt = plain(dict(learn.opt.state_dict())) if learn.opt is not None else None
    torch.save({"model": learn.model.state_dict(), "opt": opt, "epoch": epochs_done, "rng": rng_state(learn)}, buf)
    return buf.getvalue()


def rng_state(learn: Learner) -> dict:
    """Every random state the next epoch draws from: Python's, numpy's, torch's (CPU and CUDA), and each
    DataLoader's own `random.Random`, which fastai reseeds from itself every epoch to shuffle. In plain
    values and tensors only, so that the checkpoint still loads with weights_only."""
    np_state = np.random.get_state(legacy=False)
    return {"python": _listed(random.getstate()),
            "numpy": {**np_state, "state": {**np_state["state"], "key": torch.from_numpy(
                np_state["state"]["key"].astype(np.int64))}},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loaders": [_listed(dl.rng.getstate()) for dl in learn.dls.loaders if hasattr(dl, "rng")]}


def set_rng_state(learn: Learner, state: dict) -> None:
    """Put back what `rng_state` saved: a resumed run draws what the uninterrupted one would have."""
    random.setstate(_tupled(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {**np_state["state"],
                                               "key": np_state["state"]["key"].numpy().astype(np.uint32)}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, saved in zip([dl for dl in learn.dls.loaders if hasattr(dl, "rng")], state["loaders"]):
        dl.rng.setstate(_tupled(saved))


def _listed(x):
    return [_listed(v) for v in x] if isinstance(x, tuple) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def checkpoint_epoch(blob: bytes) -> int:
    """The epochs done when `save_state` wrote `blob`."""
    return int(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)["epoch"])


def load_state(learn: Learner, blob: bytes) -> int:
    """Load what `save_state` wrote (tensors and plain values only); returns the epochs done."""
    state = torch.load(io.BytesIO(blob), map_location=learn.dls.device, weights_only=True)
    learn.model.load_state_dict(state["model"])
    if state.get("opt") is not None:
        learn.create_opt()
        learn.opt.load_state_dict({"state": state["opt"]["state"], "hypers": L(state["opt"]["hypers"])})
    if state.get("rng") is not None:  # absent in checkpoints from before random state was kept
        set_rng_state(learn, state["rng"])
    return int(state["epoch"])


def evaluate(cfg: Config, blob: bytes, *, cpus: float | None = None, tta: bool = True) -> dict[str, float]:
    """Rebuild `cfg`'s Learner, load a `save_state` checkpoint and `score` it (`tta=False`: plainly only)."""
    workers, device = resources(cfg, cpus)
    learn = build_learner(cfg, make_dataloaders(cfg, workers=workers, device=device))
    load_state(learn, blob)
    return score(learn, tta=tta)
