"""The GPU's code paths, taken on the CPU: the precision and memory-format choice for a device, the
bf16 + channels_last branch through a whole fit (MixUp, label smoothing, TTA, checkpoint and resume),
the crop-and-flip transform in reduced precision and its geometry, and a training loop that makes no
host syncs of its own per batch. What only a GPU can show is in tests/test_gpu.py."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import MixUp
from fastai.losses import LabelSmoothingCrossEntropyFlat
from fastai.vision.core import TensorImage

from tests.conftest import tiny
from tune_sota import cache, precision, recipe
from tune_sota.config import Config

CPU = torch.device("cpu")
PACKAGE = str(Path(recipe.__file__).parent)


def test_precision_for_a_device():
    assert precision.precision_for(CPU, "auto") == "fp32"
    assert precision.precision_for(CPU, "bf16") == "bf16"  # asked for: the branch a GPU takes, on the CPU
    assert precision.precision_for(torch.device("cuda"), "fp32") == "fp32"
    native = precision.native_bf16()
    assert precision.precision_for(torch.device("cuda"), "auto") == ("bf16" if native else "fp16")
    if not torch.cuda.is_available():
        assert not native


def test_bf16_channels_last_fit_with_mixup_label_smoothing_tta_and_resume_on_the_cpu(image_folder):
    # At least 24 px: torch 2.14's CPU bf16 convolution sometimes returns a NaN weight gradient where a
    # 3x3 stride-2 conv meets a 1x1 input (xresnet's last stage at 8 or 16 px); GPUs use cuDNN instead.
    cfg = Config(**tiny(image_folder, epochs=2, mixup=0.2, label_smoothing=0.1, size=32, presize=40,
                        resize="24>32", precision="bf16"))
    conv_dtypes, states, reports, mixed = Counter(), {}, [], []

    def on_epoch(r, learn):
        reports.append(r)
        states[r.epoch] = recipe.save_state(learn, r.epoch)
        if r.epoch == 1:  # epoch 2's convolutions: record the dtype each one computed in
            for m in learn.model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.register_forward_hook(lambda mod, inp, out: conv_dtypes.update([out.dtype]))
            # and, for each training batch, who computes its loss: MixUp's mixed loss, with its mixing weights
            learn.model.register_forward_hook(lambda mod, inp, out: mixed.append(_mixing(learn)) if mod.training
                                              else None)

    learn = recipe.train(cfg, cpus=1, on_epoch=on_epoch)
    amp = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    assert len(amp) == 1 and amp[0].amp_mode.value == "bf16", [type(cb).__name__ for cb in learn.cbs]
    # MixUp mixed every training batch of the fit (its loss, the config's alpha, weights below 1), then was gone
    assert mixed and all(m is not None for m in mixed), mixed
    assert all(alpha == pytest.approx(0.2) for alpha, _ in mixed) and min(lam for _, lam in mixed) < 0.99
    assert any(isinstance(cb, MixUp) for cb in learn.cbs) is False  # MixUp is a fit callback, gone after the fit
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat)
    convs = [m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert all(c.weight.dtype == torch.float32 for c in convs), "autocast keeps fp32 master weights"
    assert set(conv_dtypes) == {torch.bfloat16} and sum(conv_dtypes.values()) > len(convs)
    assert [r.epoch for r in reports] == [1, 2] and all(not r.diverged and r.train_loss > 0 for r in reports)

    scores = recipe.score(learn)
    assert scores["accuracy"] == pytest.approx(reports[-1].accuracy, abs=1e-6)
    assert 0 <= scores["tta_accuracy"] <= 1
    resumed = []
    again = recipe.train(cfg, cpus=1, on_epoch=lambda r, _: resumed.append(r.epoch), checkpoint=states[1])
    assert resumed == [2]
    assert sum(isinstance(cb, MixedPrecision) for cb in again.cbs) == 1
    assert recipe.evaluate(cfg, states[2], cpus=1, tta=False)["accuracy"] == pytest.approx(scores["accuracy"])


def _mixing(learn):
    """(alpha, smallest weight) of the MixUp computing this batch's loss, or None if the loss is not MixUp's."""
    mixer = getattr(learn.loss_func, "__self__", None)
    if not isinstance(mixer, MixUp):
        return None
    return float(mixer.distrib.concentration1), float(mixer.lam.min())


def _crop(size, **kw):
    tfm = cache.RandomResizedCropFlip(size, **kw)
    tfm.before_call(None, split_idx=0)
    return tfm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_crop_and_flip_in_reduced_precision_matches_fp32(dtype):
    x = torch.rand(6, 3, 20, 20)
    tfm = _crop((12, 12), min_scale=0.35)
    torch.manual_seed(0)
    ref = tfm(TensorImage(x))
    torch.manual_seed(0)
    out = tfm(TensorImage(x.to(dtype)))
    assert out.dtype == dtype and out.shape == (6, 3, 12, 12)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -9  # the dtype's rounding of a value in [0, 1]
    assert (out.float() - ref).abs().max() <= 2 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_whole_image_crop_is_a_resize_and_a_flip_mirrors_it(dtype):
    """With min_scale 1 and a square ratio the crop is the whole image: the output is a bilinear resize,
    mirrored where the image's coin came up flip, and with both coins in a batch of 32."""
    img = torch.rand(1, 3, 20, 20)
    x = img.expand(32, -1, -1, -1).to(dtype).contiguous()
    resized = F.interpolate(img, size=(12, 12), mode="bilinear", align_corners=False).to(dtype).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.manual_seed(0)
    out = _crop((12, 12), min_scale=1.0, ratio=(1, 1), flip=True)(TensorImage(x)).float()
    plain = (out - resized).abs().amax((1, 2, 3)) <= tol
    mirrored = (out - resized.flip(-1)).abs().amax((1, 2, 3)) <= tol
    assert (plain | mirrored).all() and plain.any() and mirrored.any()
    out = _crop((12, 12), min_scale=1.0, ratio=(1, 1), flip=False)(TensorImage(x)).float()
    assert ((out - resized).abs().amax((1, 2, 3)) <= tol).all()


SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("pipeline", ["cached", "fastai"])
def test_the_training_loop_reads_nothing_back_per_batch(image_folder, monkeypatch, pipeline):
    """Every call from tune_sota's own code that would wait for a GPU (a tensor read on the host), counted
    by its call site during a fit: none may run once per batch. fastai's own reads are not counted."""
    calls, batches = Counter(), Counter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, __original=original, __name=name, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls[(Path(caller).name, sys._getframe(1).f_lineno, __name)] += 1
            return __original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = Config(**tiny(image_folder, epochs=2, batch_size=4, mixup=0.2, resize="8>16", pipeline=pipeline))
    learn = recipe.build_learner(cfg, recipe.make_dataloaders(cfg, workers=0, device=CPU))
    calls.clear()  # building the data (normalization, the cache) reads once, before any batch
    learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=[recipe.ProgressiveResize(cfg), recipe.EpochEnd(None, 0)])
    batches["train"] = learn.recorder.smooth_loss.count
    assert batches["train"] >= 4 * cfg.epochs
    per_epoch = {site: n for site, n in calls.items() if n > cfg.epochs}
    assert not per_epoch, f"reads per batch at {per_epoch} over {batches['train']} training batches"
