"""Beyond chapter 7: the Imagenette leaderboard's knobs (optimizer, schedule, Mish, self-attention, max-pool
shortcuts, ResNeXt) train, resume, validate and round-trip like chapter 7's. Real fastai, tiny data."""

from __future__ import annotations

import io
import re

import pytest
import torch
import yaml
from fastai.optimizer import Lookahead

from tests.conftest import cli, tiny
from tune_sota import recipe
from tune_sota.config import Config, ConfigError, load_space, parse_space, space_to_yaml

# The leaderboard's recipe, CPU-sized: 32 px (pool: max needs a multiple of 32), width 0.25 (the least
# the xse_ archs allow).
LEADERBOARD = {"opt": "ranger", "sched": "flat_cos", "act": "mish", "sa": True, "pool": "max",
               "arch": "xse_resnext18", "width": 0.25, "size": 32, "presize": 40}


def test_train_runs_the_leaderboard_knobs_from_the_command_line(image_folder, tmp_path):
    config = tmp_path / "leaderboard.yaml"
    config.write_text(yaml.safe_dump({**tiny(image_folder), **LEADERBOARD, "mom": 0.95, "sqr_mom": 0.99,
                                      "eps": 1e-6}))
    run = cli("train", "--config", config, "--cpus", "1", "--out", tmp_path / "model")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r"accuracy \d\.\d+", run.stdout), run.stdout
    saved = load_space(str(tmp_path / "model" / "config.yaml")).fixed()  # the export reads back as it was
    assert saved == Config(**{**tiny(image_folder), **LEADERBOARD, "mom": 0.95, "sqr_mom": 0.99, "eps": 1e-6})


def test_ranger_flat_cos_resumes_from_a_checkpoint(image_folder):
    cfg = Config(**tiny(image_folder, **LEADERBOARD, epochs=3))
    states, lrs = {}, {}

    def keep(r, learn):
        states[r.epoch] = recipe.save_state(learn, r.epoch)
        lrs[r.epoch] = learn.opt.hypers[-1]["lr"]

    learn = recipe.train(cfg, cpus=1, on_epoch=keep)
    assert isinstance(learn.opt, Lookahead) and learn.opt.hypers[-1]["mom"] == pytest.approx(0.95)  # ranger's own
    assert lrs[1] == pytest.approx(cfg.lr)  # flat for the first 75% of the schedule, then the anneal
    resumed = []
    again = recipe.train(cfg, cpus=1, on_epoch=lambda r, lrn: resumed.append((r.epoch, lrn.opt.hypers[-1]["lr"])),
                         checkpoint=states[2])
    assert [e for e, _ in resumed] == [3], "a resumed flat_cos fit (fastai's starts at epoch 0) runs what is left"
    assert resumed[0][1] == pytest.approx(lrs[3])
    # Lookahead's step count and slow weights come back as saved, not as a fresh optimizer's (0, None)
    saved = torch.load(io.BytesIO(states[2]), weights_only=True)["opt"]
    assert saved["count"] > 0 and saved["slow_weights"] is not None
    fresh = recipe.build_learner(cfg, learn.dls)
    fresh.create_opt()
    assert (fresh.opt.count, fresh.opt.slow_weights) == (0, None)
    recipe.load_state(fresh, states[2])
    assert fresh.opt.count == saved["count"]
    assert _flat(fresh.opt.slow_weights) and all(torch.equal(a, b) for a, b in zip(
        _flat(fresh.opt.slow_weights), _flat(saved["slow_weights"]), strict=True))
    # and the resumed fit ends where the uninterrupted one did: the count did not restart from zero
    assert again.opt.count == learn.opt.count
    assert all(torch.allclose(a, b) for a, b in zip(_flat(again.opt.slow_weights), _flat(learn.opt.slow_weights),
                                                    strict=True))


def _flat(groups) -> list:
    return [t for group in groups for t in group]


def _modules(model, kind) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("arch", ["xresnet18", "xse_resnext18"])
def test_mish_self_attention_and_max_pool_shortcuts_reach_the_model(arch):
    from fastai.layers import ResBlock, SimpleSelfAttention
    from torch import nn

    plain_model = recipe.make_model(Config(arch=arch, width=0.25), 10)
    model = recipe.make_model(Config(arch=arch, width=0.25, act="mish", sa=True, pool="max"), 10)
    assert _modules(model, nn.Mish) and not _modules(model, nn.ReLU)
    assert _modules(plain_model, nn.ReLU) and not _modules(plain_model, nn.Mish)
    assert _modules(model, SimpleSelfAttention) and not _modules(plain_model, SimpleSelfAttention)
    # the shortcut of each downsampling block pools; the stem's max-pool is always there, so look past it
    shortcut = [m for block in _modules(model, ResBlock) for m in block.idpath]
    assert _modules(nn.Sequential(*shortcut), nn.MaxPool2d) and not _modules(nn.Sequential(*shortcut), nn.AvgPool2d)
    plain_shortcut = nn.Sequential(*[m for block in _modules(plain_model, ResBlock) for m in block.idpath])
    assert _modules(plain_shortcut, nn.AvgPool2d) and not _modules(plain_shortcut, nn.MaxPool2d)


@pytest.mark.parametrize("opt", ["adam", "ranger", "rmsprop", "lamb", "sgd"])
def test_mom_sqr_mom_and_eps_reach_the_optimizer(image_folder, opt):
    # values no fastai optimizer defaults to, so that a dropped setting shows
    cfg = Config(**tiny(image_folder, opt=opt, mom=0.91, sqr_mom=0.97, eps=3e-7))
    learn = recipe.build_learner(cfg, recipe.make_dataloaders(cfg, workers=0, device=torch.device("cpu")))
    learn.create_opt()
    hypers = learn.opt.hypers[-1]
    assert hypers["mom"] == pytest.approx(0.91)
    if opt == "sgd":  # SGD has neither
        assert "sqr_mom" not in hypers and "eps" not in hypers
    else:
        assert (hypers["sqr_mom"], hypers["eps"]) == (pytest.approx(0.97), pytest.approx(3e-7))


def test_one_cycle_cycles_momentum_unless_mom_is_set(image_folder):
    chapter = recipe.train(Config(**tiny(image_folder, epochs=1)), cpus=1)
    assert chapter.opt_func is recipe.Adam  # the chapter's Learner, exactly
    assert max(chapter.recorder.hps["mom"]) == pytest.approx(0.95) and min(chapter.recorder.hps["mom"]) < 0.9
    held = recipe.train(Config(**tiny(image_folder, epochs=1, opt="sgd", mom=0.8)), cpus=1)
    assert set(held.recorder.hps["mom"]) == {0.8}
    assert held.recorder.hps["lr"][0] < held.recorder.hps["lr"][-2]  # warm-up: one_cycle still schedules lr


def test_resnext_narrows_its_groups_and_is_fastais_at_full_width():
    from fastai.vision.models import xresnet

    full = recipe.make_model(Config(arch="xse_resnext50"), 10)
    assert str(full) == str(xresnet.xse_resnext50(n_out=10, stem_szs=(32, 32, 64)))
    narrow = recipe.make_model(Config(arch="xresnext18", width=0.25), 10)
    groups = {m.groups for m in narrow.modules() if getattr(m, "groups", 1) > 1}
    assert groups == {16}  # 32 does not divide the 16 channels of the first stage at width 0.25


def test_defaults_are_the_chapters():
    cfg = Config()
    assert (cfg.opt, cfg.sched, cfg.act, cfg.sa, cfg.pool, cfg.mom, cfg.sqr_mom, cfg.eps, cfg.pct_start) == \
        ("adam", "one_cycle", "relu", False, "avg", 0.0, 0.0, 0.0, 0.0)
    space = parse_space({"opt": {"choice": ["adam", "ranger"]}, "sched": "flat_cos", "act": "mish", "width": 0.5})
    base = space.baseline_config()
    # the baseline is chapter 7's recipe: a knob beyond the chapter that the space fixes does not leak into it
    # (as a fixed lr or MixUp does not); the space's setting (its model, width, size) does
    assert (base.opt, base.sched, base.act, base.width) == ("adam", "one_cycle", "relu", 0.5)
    kept = parse_space({"sched": "flat_cos", "baseline": {"sched": "flat_cos"}}).baseline_config()
    assert kept.sched == "flat_cos", "the baseline: section still sets what the baseline is"


@pytest.mark.parametrize("raw,expected", [
    ({"opt": "adamw"}, "opt: 'adamw' is not allowed; must be one of adam, ranger, sgd, rmsprop, lamb"),
    ({"sched": "cosine"}, "sched: 'cosine' is not allowed; must be one of one_cycle, flat_cos"),
    ({"act": "gelu"}, "act: 'gelu' is not allowed; must be one of relu, mish"),
    ({"sa": "yes"}, "sa: 'yes' is not true or false"),
    ({"pool": "blur"}, "pool: 'blur' is not allowed; must be one of avg, max"),
    ({"mom": 1.5}, "mom: 1.5 is not allowed; must be in [0, 0.999]"),
    ({"sqr_mom": -0.1}, "sqr_mom: -0.1 is not allowed"),
    ({"eps": 2.0}, "eps: 2.0 is not allowed; must be in [0, 1]"),
    ({"pct_start": 1.0}, "pct_start: 1.0 is not allowed; must be in [0, 0.95]"),
    ({"arch": "xse_resnext101"}, "arch: 'xse_resnext101' is not allowed; must be one of xresnet18"),
    ({"pool": "max", "size": 48}, "pool: max needs every training size a multiple of 32"),
    ({"pool": {"choice": ["avg", "max"]}, "size": 64, "resize": "48>64"}, "pool: max needs every training size"),
    ({"arch": {"choice": ["xresnet18", "xse_resnext18"]}, "width": 0.125}, "xse_resnext18 needs width >= 0.25"),
])
def test_bad_values_of_the_new_keys_name_key_and_allowed(raw, expected):
    with pytest.raises(ConfigError) as e:
        parse_space(raw, source="s.yaml")
    assert str(e.value).startswith("s.yaml: ") and expected in str(e.value) and "\n" not in str(e.value), e.value


def test_new_keys_are_searchable_and_export_round_trips():
    space = parse_space({"opt": {"choice": ["adam", "ranger"]}, "mom": {"uniform": [0.85, 0.99]},
                         "sa": {"choice": [False, True]}, "eps": {"loguniform": [1e-7, 1e-4]}})
    assert set(space.searched) == {"opt", "mom", "sa", "eps"}
    cfg = space.resolve({"opt": "ranger", "mom": 0.95, "sa": True, "eps": 1e-6})
    exported = parse_space(yaml.safe_load(space_to_yaml(cfg.to_dict(), result={"accuracy": 0.5}))).fixed()
    assert exported == cfg
