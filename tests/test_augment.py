"""Lesson 3's augmentation keys (issue 27): each changes the training batches as fastai's aug_transforms
argument of that name does, on the fastai pipeline and on the cached one."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from fastai.torch_core import TensorImage
from fasttransform import Pipeline

from tune_sota import cache, data, recipe
from tune_sota.config import Config

# Every augmentation off: what each test turns one key on against.
OFF = dict(flip=False, flip_vert=False, max_rotate=0.0, max_zoom=1.0, max_lighting=0.0, max_warp=0.0,
           p_affine=1.0, p_lighting=1.0)


def _images(n=16, px=32) -> torch.Tensor:
    """Images that no flip, rotation or zoom leaves unchanged: a bright top-left quarter, a ramp."""
    x = torch.linspace(0.1, 0.5, px).expand(n, 3, px, px).clone()
    x[:, :, : px // 2, : px // 4] = 0.95
    return x


def _augmented(image_folder, **over) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = Config(**tiny(image_folder, **{**OFF, **over}))
    x = _images()
    torch.manual_seed(0)
    out = Pipeline(data.augmentations(cfg), split_idx=0)(TensorImage(x.clone()))
    return x, torch.as_tensor(out)


def _changed(x, out, tol=0.02) -> torch.Tensor:
    """Per image: whether it changed beyond resampling error."""
    return (out - x).abs().flatten(1).mean(1) > tol


def test_with_every_key_off_a_batch_is_left_as_it_is(image_folder):
    x, out = _augmented(image_folder)
    assert not _changed(x, out).any()


@pytest.mark.parametrize("key,value", [("max_rotate", 45.0), ("max_zoom", 2.0), ("max_warp", 0.6)])
def test_each_affine_key_moves_the_pixels(image_folder, key, value):
    x, out = _augmented(image_folder, **{key: value})
    assert _changed(x, out).float().mean() > 0.5, f"{key}={value} changed too few images"
    # affine transforms move pixels, they do not relight them: the brightest value stays
    assert out.amax() == pytest.approx(0.95, abs=0.02)


def test_p_affine_is_the_share_of_images_moved(image_folder):
    for p, lo, hi in ((0.0, 0.0, 0.0), (1.0, 0.9, 1.0), (0.5, 0.15, 0.85)):
        x, out = _augmented(image_folder, max_rotate=90.0, p_affine=p)
        share = _changed(x, out, tol=0.005).float().mean()
        assert lo <= share <= hi, (p, share)


def test_max_lighting_changes_brightness_and_contrast_only(image_folder):
    x, out = _augmented(image_folder, max_lighting=0.6)
    brightness = out.flatten(1).mean(1) - x.flatten(1).mean(1)
    assert brightness.abs().max() > 0.05, "no image got lighter or darker"
    # lighting keeps every pixel where it was: the bright quarter stays the brightest part of each image
    assert bool((out[:, :, :16, :8].mean((1, 2, 3)) >= out[:, :, 16:, :].mean((1, 2, 3))).all())


def test_p_lighting_is_the_share_of_images_relit(image_folder):
    for p, lo, hi in ((0.0, 0.0, 0.0), (1.0, 0.9, 1.0)):
        x, out = _augmented(image_folder, max_lighting=0.6, p_lighting=p)
        share = _changed(x, out, tol=0.01).float().mean()
        assert lo <= share <= hi, (p, share)


def _orientations(x, out):
    """Which of the dihedral images of `x` each output is (None: none of them)."""
    kinds = {"same": x, "hflip": x.flip(-1), "vflip": x.flip(-2), "transpose": x.transpose(-1, -2),
             "rot180": x.flip(-1).flip(-2)}
    found = []
    for i in range(len(x)):
        err = {k: float((out[i] - v[i]).abs().mean()) for k, v in kinds.items()}
        best = min(err, key=err.get)
        found.append(best if err[best] < 0.03 else "other")
    return set(found)


def test_flip_vert_adds_vertical_flips_and_transposes(image_folder):
    x, out = _augmented(image_folder, flip=True)
    assert _orientations(x, out) == {"same", "hflip"}
    x, out = _augmented(image_folder, flip=True, flip_vert=True)
    assert len(_orientations(x, out) - {"same", "hflip"}) >= 2, "flip_vert: no vertical flip or rotation seen"


def test_flip_vert_on_the_cached_crop_flip(image_folder):
    """The cached pipeline's own per-image crop-and-flip flips vertically and transposes with flip_vert."""
    x = _images(64)
    seen = {}
    for flip_vert in (False, True):
        tfm = cache.RandomResizedCropFlip(32, min_scale=1.0, flip=True, flip_vert=flip_vert, ratio=(1, 1))
        tfm.before_call(None, 0)
        torch.manual_seed(0)
        seen[flip_vert] = _orientations(x, tfm.encodes(TensorImage(x.clone())))
    assert seen[False] == {"same", "hflip"}
    assert {"vflip", "transpose"} <= seen[True] or {"rot180", "transpose"} <= seen[True], seen[True]


@pytest.mark.parametrize("pipeline,augment", [("fastai", "chapter7"), ("cached", "chapter7")])
def test_both_pipelines_augment_with_the_keys(image_folder, pipeline, augment):
    """The keys reach the training batches of either pipeline (validation stays unaugmented)."""
    def spread(**over):
        cfg = Config(**tiny(image_folder, pipeline=pipeline, augment=augment, min_scale=1.0, **{**OFF, **over}))
        dls = recipe.make_dataloaders(cfg, workers=0, device=torch.device("cpu"))
        torch.manual_seed(0)
        xb = dls.train.one_batch()[0]
        return float(xb.flatten(1).mean(1).std())  # how much the images' brightness varies within the batch

    torch.manual_seed(0)
    assert spread(max_lighting=0.9) > 1.5 * spread(), "max_lighting did not reach the batches"


def test_lesson3_keys_on_crop_flip_are_warned_once(image_folder):
    from tune_sota import preflight
    from tune_sota.config import parse_space

    said = []
    preflight.check_augmentations(parse_space({**tiny(image_folder), "max_warp": 0.0, "max_rotate": 20.0}), said.append)
    assert len(said) == 1 and "max_rotate, max_warp act only where" in said[0] and "augment: chapter7" in said[0]
    said.clear()
    for fine in ({"max_warp": 0.0, "augment": "chapter7"}, {"max_warp": 0.0, "pipeline": "fastai"},
                 {"flip_vert": True}):  # where they count, and flip_vert, which crop_flip applies
        preflight.check_augmentations(parse_space({**tiny(image_folder), **fine}), said.append)
    assert said == []
