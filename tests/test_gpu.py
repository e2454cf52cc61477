"""The CUDA paths: the GPU-resident cache, bf16 + channels_last training, TTA on the GPU, the precision
`auto` picks, and a training epoch with no host syncs. Skipped where there is no CUDA (CI); run them on a
GPU machine with `python -m pytest -m gpu`. tests/test_precision.py takes the same branches on the CPU."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Recorder

from tests.conftest import tiny
from tune_sota import cache, precision, recipe
from tune_sota.config import Config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("holdout", [0.0, 0.25])
def test_cache_moves_onto_the_gpu_and_batches_come_from_there(image_folder, holdout):
    cfg = Config(**tiny(image_folder, batch_size=4, holdout=holdout))
    dls = cache.cached_dataloaders(cfg, image_folder, device=CUDA)
    train, valid = dls.train.dataset, dls.valid.dataset
    assert train.x.device.type == "cuda" and valid.x.device.type == "cuda"
    if holdout:
        assert valid.x is train.x and valid.rows.device.type == "cuda", "a holdout shares one array on the GPU"
    x, y = dls.train.one_batch()
    assert x.device.type == "cuda" and y.device.type == "cuda" and x.dtype == torch.float32


def test_bf16_channels_last_training_and_tta_on_the_gpu(image_folder):
    cfg = Config(**tiny(image_folder, epochs=2, mixup=0.2, label_smoothing=0.1, resize="8>16"))
    reports = []
    learn = recipe.train(cfg, cpus=2, on_epoch=lambda r, _: reports.append(r))
    assert any(isinstance(cb, MixedPrecision) for cb in learn.cbs), "precision auto is bf16 on CUDA"
    conv = next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert [r.epoch for r in reports] == [1, 2] and all(0 <= r.accuracy <= 1 for r in reports)
    scores = recipe.score(learn)
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["tta_accuracy"] <= 1
    assert scores["accuracy"] == pytest.approx(reports[-1].accuracy, abs=1e-6)


def test_auto_precision_is_bf16_only_where_native_and_cudnn_autotunes(image_folder):
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert precision.native_bf16() == native
    cfg = Config(**tiny(image_folder))
    _, device = recipe.resources(cfg, 2)
    assert torch.backends.cudnn.benchmark
    learn = recipe.build_learner(cfg, recipe.make_dataloaders(cfg, workers=0, device=device))
    amp = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    assert len(amp) == 1 and amp[0].amp_mode.value == ("bf16" if native else "fp16")


class SyncsAreErrors(Callback):
    """Every host sync during the training batches raises (torch's sync debug mode); the Recorder's and
    EpochEnd's once-per-epoch reads come after it is switched off."""

    order = Recorder.order - 1

    def before_train(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def after_train(self):
        torch.cuda.set_sync_debug_mode("default")

    def after_cancel_train(self):
        torch.cuda.set_sync_debug_mode("default")


def test_a_training_epoch_makes_no_host_syncs(image_folder):
    # fp16's gradient scaler checks for infs on the host every step, and fastai's MixUp draws its
    # weights on the CPU and copies them: both sync by design, so neither is in this epoch.
    prec = "bf16" if precision.native_bf16() else "fp32"
    cfg = Config(**tiny(image_folder, epochs=2, resize="8>16", precision=prec))
    dls = cache.cached_dataloaders(cfg, image_folder, device=CUDA)
    assert dls.train.dataset.x.is_cuda
    learn = recipe.build_learner(cfg, dls)
    reports = []
    try:
        learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=[recipe.ProgressiveResize(cfg),
                                                     recipe.EpochEnd(lambda r, _: reports.append(r), 0),
                                                     SyncsAreErrors()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r.epoch for r in reports] == [1, 2] and not any(r.diverged for r in reports)
