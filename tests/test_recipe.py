"""The training function on its own: no Ray, real fastai, tiny data."""

import subprocess
import sys

import pytest
from fastai.callback.mixup import MixUp
from fastai.losses import LabelSmoothingCrossEntropyFlat

from tests.conftest import tiny
from tune_sota import recipe
from tune_sota.config import Config


@pytest.mark.parametrize("pipeline", ["cached", "fastai"])
def test_progressive_resizing_with_validation_at_final_size(image_folder, pipeline):
    cfg = Config(**tiny(image_folder, epochs=3, resize="8>12>16", mixup=0.2, label_smoothing=0.1, pipeline=pipeline))
    seen = []

    def on_epoch(r, learn):
        train_x = learn.dls.train.one_batch()[0]
        valid_x = learn.dls.valid.one_batch()[0]
        seen.append((r.epoch, r.size, train_x.shape[-1], valid_x.shape[-1]))
        assert any(isinstance(cb, MixUp) for cb in learn.cbs)
        assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat)
        assert 0 <= r.accuracy <= 1 and r.valid_loss > 0 and not r.diverged
        assert 0 < r.cpu_s < r.epoch_s * 4  # the process's CPU seconds of the epoch (a few threads at most)

    recipe.train(cfg, cpus=1, on_epoch=on_epoch)
    assert seen == [(1, 8, 8, 16), (2, 12, 12, 16), (3, 16, 16, 16)]


def test_resume_from_checkpoint_runs_only_the_remaining_epochs(image_folder):
    cfg = Config(**tiny(image_folder, epochs=3))
    states = {}
    recipe.train(cfg, cpus=1, on_epoch=lambda r, learn: states.__setitem__(r.epoch, recipe.save_state(learn, r.epoch)))
    assert sorted(states) == [1, 2, 3]
    resumed = []
    learn = recipe.train(cfg, cpus=1, on_epoch=lambda r, _: resumed.append(r.epoch), checkpoint=states[2])
    assert resumed == [3]
    scores = recipe.score(learn)
    assert set(scores) == {"accuracy", "tta_accuracy"} and all(0 <= v <= 1 for v in scores.values())


def test_evaluate_reloads_a_checkpoint_to_the_same_accuracy(image_folder):
    cfg = Config(**tiny(image_folder, epochs=2))
    blob = {}
    learn = recipe.train(cfg, cpus=1, on_epoch=lambda r, lrn: blob.__setitem__("s", recipe.save_state(lrn, r.epoch)))
    again = recipe.evaluate(cfg, blob["s"], cpus=1)
    assert again["accuracy"] == pytest.approx(recipe.score(learn, tta=False)["accuracy"])


def test_training_code_never_imports_ray():
    code = "import sys, tune_sota.recipe, tune_sota.data; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("pipeline", ["cached", "fastai"])
def test_a_resumed_run_draws_what_the_uninterrupted_one_did(image_folder, pipeline):
    """Shuffling, crops, flips and MixUp after a resume come from the checkpoint's random state: epochs 3
    and 4 of a run resumed after epoch 2 match the uninterrupted run's (they once replayed epoch 1's draws)."""
    cfg = Config(**tiny(image_folder, epochs=4, mixup=0.4, resize="12>16", pipeline=pipeline, workers=0))
    rows, states = {}, {}

    def keep(r, learn):
        rows[r.epoch] = (r.train_loss, r.valid_loss, r.accuracy)
        states[r.epoch] = recipe.save_state(learn, r.epoch)

    recipe.train(cfg, cpus=1, on_epoch=keep)
    resumed = {}
    recipe.train(cfg, cpus=1, checkpoint=states[2],
                 on_epoch=lambda r, _: resumed.__setitem__(r.epoch, (r.train_loss, r.valid_loss, r.accuracy)))
    assert sorted(resumed) == [3, 4]
    for epoch in (3, 4):  # the model after each epoch; train_loss is fastai's running mean, which restarts per fit
        assert resumed[epoch][1:] == pytest.approx(rows[epoch][1:], rel=1e-4, abs=1e-6), epoch
