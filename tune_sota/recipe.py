"""Chapter 7's recipe: build a fastai Learner for a `Config`, fit it with one-cycle, progressive
resizing, MixUp and label smoothing, and score it plainly and with TTA. Beyond the chapter, the
Imagenette leaderboard's knobs, all fastai's own: the optimizer (`opt`, `mom`, `sqr_mom`, `eps`), a
flat-then-cosine schedule (`sched`), Mish, self-attention, max-pool shortcuts and the ResNeXt archs.
Never imports Ray: the Tune trainable wraps `train`, and `tune-sota train` calls it directly.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (patches Learner.to_channelslast)
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler, combined_cos, fit_one_cycle  # noqa: F401  (patches Learner)
from fastai.imports import noop  # the one ProgressCallback compares the logger with
from fastai.layers import AvgPool, MaxPool
from fastai.learner import AvgSmoothLoss, Learner, Recorder
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import AccumMetric, accuracy
from fastai.optimizer import SGD, Adam, Lamb, RMSProp, ranger
from fastai.torch_core import params, set_seed
from fastai.vision.learner import create_timm_model, default_split
from fastai.vision.models import xresnet
from fastcore.foundation import L
from torch import nn

from tune_sota import cache, data, precision, pretrained, sources
from tune_sota.config import ARCHS, Config, plain
from tune_sota.results import EpochReport
from tune_sota.schedule import size_at_epoch

OnEpoch = Callable[[EpochReport, Learner], None]
log = logging.getLogger(__name__)


class ProgressiveResize(Callback):
    """Sets the training image size for each epoch from the config's stages."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def before_epoch(self):
        epoch = getattr(self.learn, "epoch_offset", 0) + self.epoch  # of the whole run: fine-tuning fits twice
        self.learn.train_size = size_at_epoch(self.cfg.stages, self.cfg.epochs, epoch)
        data.set_train_size(self.dls, self.learn.train_size)


class EpochEnd(Callback):
    """Hands each finished epoch's figures to `on_epoch`; stops the fit after an epoch whose loss went NaN/inf."""

    order = Recorder.order + 1  # after the Recorder has computed the epoch's metrics

    def __init__(self, on_epoch: OnEpoch | None, start_epoch: int, epochs: int | None = None):
        self.on_epoch, self.start_epoch, self.diverged = on_epoch, start_epoch, False
        self.epochs = epochs  # of the whole run (fine-tuning's two fits count as one schedule); None: this fit's

    @property
    def run_epoch(self) -> int:
        """This epoch (0-based) in the whole run: fine-tuning's second fit starts after the frozen epochs."""
        return getattr(self.learn, "epoch_offset", 0) + self.epoch

    @property
    def run_epochs(self) -> int:
        return self.epochs or self.n_epoch

    def before_epoch(self):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def after_train(self):
        # Once per epoch, not per batch: reading a GPU loss on the host waits for the GPU, and four
        # trials sharing one then each pay their CPU time plus their GPU time for every step. The
        # smoothed loss stays NaN/inf once any batch's loss was, so nothing is missed; a diverged run
        # trains at most one epoch of NaNs before it stops.
        smooth = getattr(self.learn, "smooth_loss", None)
        if smooth is not None and not bool(torch.isfinite(smooth)):
            self.diverged = True
            raise CancelFitException()

    def after_epoch(self):
        if self.run_epoch < self.start_epoch:  # skipped while resuming from a checkpoint
            return
        values = list(self.recorder.values[-1]) if self.recorder.values else []
        train_loss, valid_loss, acc = (values + [math.nan] * 3)[:3]
        report = EpochReport(
            epoch=self.run_epoch + 1, epochs=self.run_epochs, size=getattr(self.learn, "train_size", 0),
            train_loss=float(train_loss), valid_loss=float(valid_loss), accuracy=float(acc),
            epoch_s=time.perf_counter() - self.t0, diverged=self.diverged, cpu_s=time.process_time() - self.cpu0,
            frozen=bool(getattr(self.learn, "frozen_phase", False)),
        )
        if self.on_epoch:
            self.on_epoch(report, self.learn)

    def after_cancel_fit(self):
        if self.diverged and self.on_epoch:  # after_epoch does not run once the fit is cancelled
            self.on_epoch(EpochReport(self.run_epoch + 1, self.run_epochs, getattr(self.learn, "train_size", 0),
                                      math.nan, math.nan, 0.0, time.perf_counter() - self.t0, True), self.learn)


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss kept on the loss's device: fastai's copies every batch's loss to
    the host (a GPU sync per step); this one is read there once per epoch (`EpochEnd`, the Recorder)."""

    def accumulate(self, learn):
        loss = learn.loss.detach().float().mean()
        self.count += 1  # after a reset `val` is a CPU zero: start from a zero where the loss is
        self.val = torch.lerp(loss, self.val if self.count > 1 else torch.zeros_like(loss), self.beta)


def resources(cfg: Config, cpus: float | None) -> tuple[int, torch.device]:
    """Set torch's threads from the CPUs this run was given; return DataLoader workers and device."""
    n = max(1, int(cpus if cpus else os.cpu_count() or 1))
    torch.set_num_threads(n)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision.setup_device(device)
    workers = cfg.workers if cfg.workers >= 0 else (n if device.type == "cuda" else n - 1)
    return workers, device


# fastai's ResNeXt archs as (expansion, blocks per stage, SE reduction; 0 = no squeeze-and-excitation),
# the arguments fastai.vision.models.xresnet's xse_resnext18... pass to XResNet, so that `width` can
# narrow their groups too (see `make_model`).
RESNEXT = {"xse_resnext18": (1, xresnet.g0, 16), "xse_resnext34": (1, xresnet.g1, 16),
           "xse_resnext50": (4, xresnet.g1, 16), "xresnext18": (1, xresnet.g0, 0),
           "xresnext34": (1, xresnet.g1, 0), "xresnext50": (4, xresnet.g1, 0)}
ACTIVATIONS = {"relu": nn.ReLU, "mish": nn.Mish}
POOLS = {"avg": AvgPool, "max": MaxPool}


def make_model(cfg: Config, n_out: int) -> nn.Module:
    """The config's xresnet, from scratch, narrowed by `width`, with its activation, pool and self-attention."""
    # The stem's last width is fixed by xresnet's first block, so only its first two convs narrow.
    stem = (max(8, int(32 * cfg.width)), max(8, int(32 * cfg.width)), 64)
    kw = dict(n_out=n_out, widen=cfg.width, stem_szs=stem, sa=cfg.sa, act_cls=ACTIVATIONS[cfg.act],
              pool=POOLS[cfg.pool])
    if cfg.arch not in RESNEXT:
        return getattr(xresnet, cfg.arch)(**kw)
    expansion, layers, reduction = RESNEXT[cfg.arch]
    # fastai's ResNeXt has 32 groups of 4 channels (a grouped conv twice a stage's width); a grouped conv
    # needs the groups to divide its input, which a narrowed stage no longer may (16 channels at width
    # 0.25). So the groups are the largest divisor of 32 that divides every stage's width, each group
    # wider to keep the grouped conv at twice the stage's width: at width >= 0.5 exactly fastai's model.
    groups = math.gcd(32, *(int(c * cfg.width) for c in (64, 128, 256, 512)))
    return xresnet.XResNet(xresnet.SEResNeXtBlock, expansion, layers, groups=groups, reduction=reduction,
                           base_width=128 / groups, **kw)


def rmsprop(params, lr, eps: float = 1e-8, **kw):
    """fastai's RMSProp with `eps` applied: fastai 2.8's takes `eps` but never hands it to its step."""
    opt = RMSProp(params, lr, **kw)
    opt.set_hyper("eps", eps)
    return opt


OPTIMIZERS = {"adam": Adam, "ranger": ranger, "sgd": SGD, "rmsprop": rmsprop, "lamb": Lamb}


def opt_func(cfg: Config):
    """The config's fastai optimizer, with `mom`, `sqr_mom` and `eps` where set (0 = fastai's default)."""
    kw = {k: v for k, v in (("mom", cfg.mom), ("sqr_mom", cfg.sqr_mom), ("eps", cfg.eps)) if v}
    if cfg.opt == "sgd":
        kw.pop("sqr_mom", None), kw.pop("eps", None)  # SGD has neither
        kw.setdefault("mom", 0.9)  # fastai's SGD defaults to none, and builds no momentum step without it
    if cfg.opt == "adam" and not kw:
        return Adam  # chapter 7's Learner, exactly
    return functools.partial(OPTIMIZERS[cfg.opt], **kw)


def fit(learn: Learner, cfg: Config, cbs: list, start_epoch: int = 0) -> None:
    """Fit with the config's schedule from `start_epoch`: fastai's one-cycle, or its flat-then-cosine.
    With pretrained weights it is fastai's `fine_tune`: the head alone for `cfg.frozen_epochs` (one-cycle
    at lr, pct_start 0.99), then everything with discriminative rates (lr/2/lr_mult .. lr/2, div 5,
    pct_start 0.3 unless set), one count of `cfg.epochs` across both fits (`learn.epoch_offset`), so that
    reports, rungs, resizing and resume see one schedule; `start_epoch` may fall in either phase."""
    moms = (cfg.mom,) * 3 if cfg.mom else None  # fastai cycles 0.95>0.85>0.95 over any optimizer's own
    learn.epoch_offset, learn.frozen_phase = 0, False
    if cfg.pretrained is False:
        _fit_schedule(learn, cfg, cfg.epochs, cfg.lr, cbs, start_epoch, moms)
        return
    frozen = cfg.frozen_epochs
    if start_epoch < frozen:
        _freeze(learn, True, keep_state=start_epoch > 0)
        learn.frozen_phase = True
        learn.fit_one_cycle(frozen, slice(cfg.lr), pct_start=0.99, wd=cfg.wd, moms=moms, cbs=cbs,
                            start_epoch=start_epoch)
    _freeze(learn, False, keep_state=start_epoch > frozen)
    learn.epoch_offset, learn.frozen_phase = frozen, False
    lr = cfg.lr / 2
    _fit_schedule(learn, cfg, cfg.epochs - frozen, slice(lr / cfg.lr_mult, lr), cbs,
                  max(0, start_epoch - frozen), moms, pct_start=cfg.pct_start or 0.3, div=5.0)


def _freeze(learn: Learner, frozen: bool, keep_state: bool) -> None:
    """fastai's `freeze` (the head alone trains) or `unfreeze`; these also clear the optimizer's state, as
    fine_tune does at the unfreeze, except that a run resumed inside a phase keeps the state it loaded."""
    if learn.opt is None:
        learn.create_opt()
    learn.opt.freeze_to(-1 if frozen else 0)
    if not keep_state:
        learn.opt.clear_state()


def _fit_schedule(learn: Learner, cfg: Config, epochs: int, lr, cbs: list, start_epoch: int, moms,
                  pct_start: float = 0.0, div: float = 25.0) -> None:
    """One fit of `epochs` with the config's schedule at `lr` (a rate, or a slice spread over the parameter
    groups as fastai spreads it)."""
    if cfg.sched == "one_cycle":
        learn.fit_one_cycle(epochs, lr, pct_start=pct_start or cfg.pct_start or 0.25, div=div, wd=cfg.wd, moms=moms,
                            cbs=cbs, start_epoch=start_epoch)
        return
    # fit_flat_cos's own schedule (flat at lr, cosine to lr/1e5; momentum left to the optimizer), written
    # out because fastai 2.8's fit_flat_cos passes start_epoch=0 to fit: a resumed trial would restart.
    pct = cfg.pct_start or 0.75
    if isinstance(lr, slice):
        if learn.opt is None:
            learn.create_opt()
        learn.opt.set_hyper("lr", lr)
        lr = np.array([h["lr"] for h in learn.opt.hypers])
    sched = ParamScheduler({"lr": combined_cos(pct, lr, lr, lr / 1e5)})
    learn.fit(epochs, cbs=[sched, *cbs], wd=cfg.wd, start_epoch=start_epoch)


def _body_head_split(model: nn.Module):
    """Two parameter groups, the body and the head (fastai's split of a timm model, `default_split`): what
    `freeze` keeps frozen and what `lr_mult` spreads the rates over."""
    *body, head = model.children()  # an XResNet cannot be sliced into a smaller XResNet
    return L(nn.Sequential(*body), head).map(params)


def model_for(cfg: Config, classes: list[str]) -> tuple[nn.Module, Callable | None]:
    """The config's model for `classes` and its parameter-group splitter (None: one group): fastai's xresnet
    (`make_model`) or a timm body with fastai's head (`create_timm_model`, as `vision_learner` builds it),
    from scratch or with the weights `cfg.pretrained` names. Never downloads (the driver did: `pretrained`)."""
    weights = pretrained.resolve(cfg.pretrained, cfg.arch)
    if cfg.arch in ARCHS:
        model, split = make_model(cfg, len(classes)), _body_head_split
    else:
        overlay = {"file": str(weights.path)} if weights is not None and weights.kind in ("hub", "file") else None
        model, _ = create_timm_model(cfg.arch, len(classes), pretrained=overlay is not None,
                                     **({"pretrained_cfg_overlay": overlay} if overlay else {}))
        split = default_split
        if overlay:  # timm loaded them (its classifier dropped): fastai's head is new
            log.info("pretrained: %s: timm's weights for the body, a new head for %d classes", weights.path,
                     len(classes))
            return model, split
    if weights is None:
        return model, (split if cfg.arch not in ARCHS else None)
    log.info("pretrained: %s", pretrained.load_into(model, weights, classes))
    return model, split


class SmoothedBCE(BCEWithLogitsLossFlat):
    """fastai's multi-label loss with label smoothing: each target 0/1 becomes eps/2 / 1 - eps/2."""

    def __init__(self, eps: float, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps

    def __call__(self, inp, targ, **kwargs):
        return super().__call__(inp, targ.float() * (1 - self.eps) + self.eps / 2, **kwargs)


def multi_score(metric: str, probs: torch.Tensor, targs: torch.Tensor, threshold: float) -> float:
    """A multi-label score of probabilities against 0/1 targets at `threshold`: F2 averaged per image (an
    image with no label predicted and none true counts 1, as scikit-learn's zero_division=1) or accuracy_multi."""
    pred, true = probs > threshold, targs.bool()
    if metric == "accuracy_multi":
        return float((pred == true).float().mean())
    tp = (pred & true).sum(1).float()
    fp, fn = (pred & ~true).sum(1).float(), (~pred & true).sum(1).float()
    denom = 5 * tp + 4 * fn + fp
    return float(torch.where(denom > 0, 5 * tp / denom.clamp(min=1), torch.ones_like(tp)).mean())


THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.01), 2)  # what fit_threshold tries


def fit_threshold(learn: Learner) -> tuple[float, float]:
    """(threshold, score there) that maximise the config's multi-label score on the validation set (a
    search trial's holdout): fitted after training, never searched."""
    probs, targs = learn.get_preds(dl=learn.dls.valid)
    scores = [multi_score(learn.multi_metric, probs, targs, t) for t in THRESHOLDS]
    best = int(np.argmax(scores))
    return float(THRESHOLDS[best]), float(scores[best])


def loss_and_metric(cfg: Config):
    """The loss and the one metric (reported as `accuracy`) for single- or multi-label data."""
    if not cfg.multi_label:
        loss = LabelSmoothingCrossEntropyFlat(eps=cfg.label_smoothing) if cfg.label_smoothing \
            else CrossEntropyLossFlat()
        return loss, accuracy
    loss = SmoothedBCE(cfg.label_smoothing, thresh=cfg.threshold) if cfg.label_smoothing \
        else BCEWithLogitsLossFlat(thresh=cfg.threshold)
    # one definition of the score (multi_score) in training, TTA, the threshold's fit and the confirmation
    return loss, AccumMetric(functools.partial(_scored, cfg.multi_metric, cfg.threshold), activation="sigmoid",
                             flatten=False, name=cfg.multi_metric)


def _scored(metric: str, threshold: float, probs, targs) -> float:
    return multi_score(metric, probs, targs, threshold)


def build_learner(cfg: Config, dls) -> Learner:
    """The config's model (`model_for`) with its loss, metrics, optimizer and precision; quiet (no bars)."""
    model, splitter = model_for(cfg, [str(c) for c in dls.vocab])
    loss, metric = loss_and_metric(cfg)
    learn = Learner(dls, model, loss_func=loss, metrics=metric, wd=cfg.wd, opt_func=opt_func(cfg),
                    **({"splitter": splitter} if splitter else {}))
    # what `score` and `fit_threshold` judge by: None for single-label data
    learn.multi_metric, learn.threshold = (cfg.multi_metric, cfg.threshold) if cfg.multi_label else (None, None)
    learn.remove_cb(ProgressCallback)  # bars and per-epoch tables flood logs; EpochEnd reports instead
    learn.logger = lambda *_: None
    learn.recorder.smooth_loss = DeviceSmoothLoss()  # no per-batch copy of the loss to the host
    device = dls.device or torch.device("cpu")
    precision.apply(learn, precision.precision_for(device, cfg.precision), device)
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
    cbs = [ProgressiveResize(cfg), EpochEnd(on_epoch, start_epoch, cfg.epochs)]
    if cfg.mixup > 0:
        cbs.append(MixUp(cfg.mixup))
    if progress:
        learn.logger = noop  # bars only: the epoch's figures come from `on_epoch`, not fastai's table
        cbs.append(ProgressCallback())
    if start_epoch < cfg.epochs:
        fit(learn, cfg, cbs, start_epoch)
    return learn


def score(learn: Learner, tta: bool = True) -> dict[str, float]:
    """Validation accuracy plainly and with test-time augmentation (fastai's `tta`); for multi-label data
    the config's score at its threshold, under the same names."""
    dl = learn.dls.valid
    metric = getattr(learn, "multi_metric", None)
    if metric:
        out = {"accuracy": multi_score(metric, *learn.get_preds(dl=dl)[:2], learn.threshold)}
    else:
        out = {"accuracy": float(learn.validate(dl=dl)[1])}
    if tta:
        preds, targs = learn.tta(dl=dl)
        out["tta_accuracy"] = multi_score(metric, preds, targs, learn.threshold) if metric \
            else float(accuracy(preds, targs))
    return out


def save_state(learn: Learner, epochs_done: int) -> bytes:
    """Model, optimizer and random state after `epochs_done` epochs, as bytes (never a pickled Learner)."""
    buf = io.BytesIO()
    # Optimizer hyper-parameters hold numpy scalars (and fastcore's L): plain values load with weights_only.
    opt = plain(dict(learn.opt.state_dict())) if learn.opt is not None else None
    torch.save({"model": learn.model.state_dict(), "opt": opt, "epoch": epochs_done, "rng": rng_state(learn),
                **about_model(learn)}, buf)
    return buf.getvalue()


def about_model(learn: Learner) -> dict:
    """The classes and normalization statistics a model was trained with, saved beside its weights so
    that a fine-tune from it (`pretrained: PATH`) knows whether to keep its head and how to normalize."""
    return {"classes": [str(c) for c in learn.dls.vocab], "stats": [list(s) for s in data.stats_of(learn.dls)]}


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
        # ranger's Lookahead adds its step count and slow weights beside the state and hypers
        learn.opt.load_state_dict({**state["opt"], "hypers": L(state["opt"]["hypers"])})
    if state.get("rng") is not None:  # absent in checkpoints from before random state was kept
        set_rng_state(learn, state["rng"])
    return int(state["epoch"])


def evaluate(cfg: Config, blob: bytes, *, cpus: float | None = None, tta: bool = True) -> dict[str, float]:
    """Rebuild `cfg`'s Learner, load a `save_state` checkpoint and `score` it (`tta=False`: plainly only)."""
    workers, device = resources(cfg, cpus)
    learn = build_learner(cfg, make_dataloaders(cfg, workers=workers, device=device))
    load_state(learn, blob)
    return score(learn, tta=tta)
