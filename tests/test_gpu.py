"""The CUDA paths: the GPU-resident cache, bf16 + channels_last training, TTA on the GPU. Skipped where
there is no CUDA (CI); run them on a GPU machine with `python -m pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from fastai.callback.fp16 import MixedPrecision

from tests.conftest import tiny
from tune_sota import cache, recipe
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
