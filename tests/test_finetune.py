"""Fine-tuning (issue 27): timm models, `pretrained:` weights files and tune_sota models, fastai's
fine_tune as one schedule (freeze_epochs, lr_mult), rungs that wait for the unfreeze, the offline line."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import cli, make_image_folder, tiny, write_space
from safetensors.torch import save_file

from tune_sota import model, recipe
from tune_sota.config import Config, ConfigError, load_space
from tune_sota.scheduler import ScheduleASHA
from tune_sota.trainable import checkpoint_epochs


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A safetensors file of timm's tiny test_resnet, as a published checkpoint would hold it."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return path


def _body_weight(learn):
    """The first conv of the timm body (frozen in the first phase; BatchNorm trains throughout, as fastai's)."""
    return learn.model[0].model.conv1[0].weight.detach().clone()


def test_a_timm_model_fine_tunes_from_a_weights_file(image_folder, timm_weights, caplog):
    """fastai's fine_tune as one schedule: epoch 1 trains the head alone on the file's body, then everything
    with rates lr/2/lr_mult .. lr/2; epochs count 1..3 across both fits; the model's own statistics."""
    cfg = Config(**tiny(image_folder, arch="test_resnet", pretrained=str(timm_weights), epochs=3, freeze_epochs=1,
                        lr_mult=50.0))
    from safetensors.torch import load_file

    published = load_file(str(timm_weights))["conv1.0.weight"]
    seen = []

    def on_epoch(r, learn):
        seen.append((r.epoch, r.epochs, r.frozen, torch.equal(_body_weight(learn), published)))
        hypers = [h["lr"] for h in learn.opt.hypers]
        seen[-1] += (round(hypers[-1] / hypers[0]),)

    with caplog.at_level(logging.INFO, logger="tune_sota.recipe"):
        learn = recipe.train(cfg, on_epoch=on_epoch)
    assert [s[:4] for s in seen] == [(1, 3, True, True), (2, 3, False, False), (3, 3, False, False)]
    assert [s[4] for s in seen[1:]] == [50, 50], "discriminative rates: the body at lr/lr_mult"
    assert "a new head for 3 classes" in caplog.text
    mean, std = recipe.data.stats_of(learn.dls)
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3), "test_resnet's own statistics"


def test_freeze_epochs_zero_trains_everything_from_the_start(image_folder, timm_weights):
    cfg = Config(**tiny(image_folder, arch="test_resnet", pretrained=str(timm_weights), epochs=2, freeze_epochs=0))
    frozen = []
    recipe.train(cfg, on_epoch=lambda r, learn: frozen.append(r.frozen))
    assert frozen == [False, False]
    assert Config(**tiny(image_folder, arch="test_resnet", pretrained=str(timm_weights))).frozen_epochs == 1
    assert Config(**tiny(image_folder)).frozen_epochs == 0, "from scratch nothing is frozen"


def test_pretrained_configs_that_cannot_work_are_one_line_errors(image_folder, timm_weights):
    base = tiny(image_folder, arch="test_resnet", pretrained=str(timm_weights))
    for bad, says in (({"normalize": "dataset"}, "normalize: dataset with pretrained"),
                      ({"pretrained": False, "freeze_epochs": 1}, "needs pretrained weights"),
                      ({"freeze_epochs": 2, "epochs": 2}, "epochs counts both phases"),
                      ({"arch": "xresnet18", "pretrained": True}, "fastai publishes no weights"),
                      ({"arch": "resnet9000"}, "or a timm model name")):
        with pytest.raises(ConfigError, match=says):
            Config(**{**base, **bad})


def test_a_fine_tune_resumes_in_either_phase(image_folder, timm_weights):
    """A checkpoint taken in the frozen phase or after the unfreeze goes on to the uninterrupted run's end."""
    cfg = Config(**tiny(image_folder, arch="test_resnet", pretrained=str(timm_weights), epochs=4, freeze_epochs=2,
                        lr=1e-2))
    blobs, full = {}, []

    def keep(r, learn):
        blobs[r.epoch] = recipe.save_state(learn, r.epoch)
        full.append((r.epoch, r.frozen, r.valid_loss))

    done = recipe.train(cfg, on_epoch=keep)
    end = done.model.state_dict()
    for at in (1, 2, 3):  # inside the frozen phase, at the unfreeze, inside the unfrozen phase
        resumed = []
        learn = recipe.train(cfg, checkpoint=blobs[at], on_epoch=lambda r, _, into=resumed: into.append(
            (r.epoch, r.frozen, r.valid_loss)))
        assert [e for e, *_ in resumed] == list(range(at + 1, 5))
        assert [r[:2] for r in resumed] == [r[:2] for r in full[at:]]
        assert [r[2] for r in resumed] == pytest.approx([r[2] for r in full[at:]]), f"resumed after epoch {at}"
        for k, v in learn.model.state_dict().items():
            assert torch.allclose(v.float(), end[k].float(), atol=1e-5), k


def _trained(image_folder, tmp_path, name, **over):
    cfg = Config(**tiny(image_folder, epochs=1, **over))
    learn = recipe.train(cfg)
    return model.save(learn, cfg, tmp_path / name, {}), learn


def _two_class_folder(image_folder, tmp_path):
    two = tmp_path / "two"
    for split in ("train", "val"):
        for c in ("red", "green"):
            shutil.copytree(image_folder / split / c, two / split / c)
    return two


def test_a_fine_tune_from_an_earlier_model_with_other_classes(image_folder, tmp_path, caplog):
    """Lesson 3's loop: a tune_sota model (folder or best.yaml-like path) fine-tuned on other classes keeps its
    body, gets a new head, and says so; on the same classes it keeps its head too."""
    folder, earlier = _trained(image_folder, tmp_path, "earlier")
    before = {k: v.clone() for k, v in earlier.model.state_dict().items()}
    two = _two_class_folder(image_folder, tmp_path)
    cfg = Config(**tiny(two, pretrained=str(folder), epochs=2, freeze_epochs=1))
    with caplog.at_level(logging.INFO, logger="tune_sota.recipe"):
        model_, _ = recipe.model_for(cfg, ["green", "red"])
    assert "head replaced (3 classes -> 2 classes)" in caplog.text
    last = str(len(model_) - 1)
    for k, v in model_.state_dict().items():
        if k.split(".")[0] != last:
            assert torch.equal(v, before[k]), k
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tune_sota.recipe"):
        same, _ = recipe.model_for(Config(**tiny(image_folder, pretrained=str(folder))), ["blue", "green", "red"])
    assert "head included (same 3 classes)" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in same.state_dict().items())
    reports = []
    recipe.train(cfg, on_epoch=lambda r, _: reports.append((r.epoch, r.frozen)))
    assert reports == [(1, True), (2, False)]


def test_a_fine_tune_from_an_export(image_folder, tmp_path, caplog):
    """An export.pkl (what a deployed model is) is a starting point too: its body, its statistics."""
    from tune_sota import export

    folder, _ = _trained(image_folder, tmp_path, "earlier", normalize="dataset")
    out = export.export(folder, tmp_path / "export")
    two = _two_class_folder(image_folder, tmp_path)
    cfg = Config(**tiny(two, pretrained=str(out / "export.pkl"), epochs=2))
    with caplog.at_level(logging.INFO, logger="tune_sota.recipe"):
        learn = recipe.train(cfg)
    assert "head replaced (3 classes -> 2 classes)" in caplog.text
    shipped = json.loads((out / "classes.json").read_text())
    mean, std = recipe.data.stats_of(learn.dls)
    assert mean == pytest.approx(shipped["mean"]) and std == pytest.approx(shipped["std"]), \
        "the earlier model's measured statistics, not ImageNet's"
    assert mean != pytest.approx(list(recipe.pretrained.IMAGENET_STATS[0]))


def test_weights_of_another_model_are_a_one_line_error(image_folder, tmp_path, timm_weights):
    folder, _ = _trained(image_folder, tmp_path, "narrow")
    with pytest.raises(Exception, match="is a xresnet18 but arch is test_resnet"):
        recipe.model_for(Config(**tiny(image_folder, arch="test_resnet", pretrained=str(folder))), ["a", "b"])
    wide = tmp_path / "wide.pth"
    torch.save(recipe.make_model(Config(**tiny(image_folder, width=0.25)), 3).state_dict(), wide)
    with pytest.raises(Exception, match="does not fit this XResNet"):
        recipe.model_for(Config(**tiny(image_folder, pretrained=str(wide))), ["a", "b", "c"])


def test_pretrained_true_offline_is_one_line_before_ray(image_folder, tmp_path):
    """No network and no cache: exit 2 with one line naming HF_HUB_OFFLINE, the cache folder and the PATH way;
    no traceback, no hang, nothing of Ray started."""
    space = write_space(tmp_path / "ft.yaml", tiny(image_folder, arch="test_resnet", pretrained=True))
    cache = tmp_path / "hf"
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}):
        saved = {k: os.environ.get(k) for k in ("HF_HOME", *env)}
        os.environ.update(HF_HOME=str(cache), **env)
        try:
            run = cli("search", "--space", space, "--results", tmp_path / "results", timeout=120)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        err = run.stderr.strip()
        assert run.returncode == 2, run.stdout[-2000:] + err[-2000:]
        assert len(err.splitlines()) == 1 and "Traceback" not in run.stdout + run.stderr, err
        assert "HF_HUB_OFFLINE" in err and str(cache / "hub") in err and "pretrained: PATH" in err, err
        assert "Ray" not in run.stdout and not (tmp_path / "results").exists()


def test_a_rung_waits_for_the_unfreeze():
    """A trial still training its head alone at a rung is judged at its first unfrozen epoch."""
    s = ScheduleASHA(shares=[0.25], reduction_factor=2, metric="accuracy", mode="max")
    for i, v in enumerate([0.6, 0.5]):
        s.decide(f"p{i}", 1, 4, v)
    assert s.decide("ft", 1, 4, 0.2, unfrozen=False) == "CONTINUE" and "ft" not in s.records[0.25]
    assert s.decide("ft", 2, 4, 0.3, unfrozen=True) == "STOP" and s.records[0.25]["ft"] == 0.3
    from types import SimpleNamespace

    trial = SimpleNamespace(trial_id="t2", config={"size": 16})
    assert s.on_trial_result(None, trial, {"accuracy": 0.1, "epoch": 1, "epochs": 4, "frozen": True}) == "CONTINUE"
    assert "t2" not in s.records[0.25]


def test_a_fine_tune_checkpoints_where_its_rung_judges_it(image_folder, timm_weights):
    cfg = Config(**tiny(image_folder, arch="test_resnet", pretrained=str(timm_weights), epochs=4, freeze_epochs=2))
    from tune_sota import trainable

    first = max(trainable.first_final_epoch(cfg), cfg.frozen_epochs + 1)
    assert first == 3 and checkpoint_epochs(4, [0.25], 0, first) == {3, 4}


@pytest.mark.slow
def test_a_search_whose_rung_waits_for_the_unfreeze(tmp_path):
    """A real search of fine-tunes (weights made here) frozen for 2 of 4 epochs: the 25% rung falls on epoch 1,
    in the frozen phase, and each trial is recorded there with its epoch-3 accuracy, its first unfrozen one."""
    folder = make_image_folder(tmp_path / "data", per_class=(30, 4), seed=3)
    weights = tmp_path / "xresnet.pth"
    torch.save(recipe.make_model(Config(**tiny(folder)), 10).state_dict(), weights)
    space = write_space(tmp_path / "ft.yaml", {**tiny(folder, pretrained=str(weights), epochs=4, freeze_epochs=2),
                                               "lr": {"loguniform": [3e-3, 1e-1]}},
                        {"num_samples": 3, "max_concurrent": 2, "grace": 0.25, "reduction_factor": 4,
                         "startup_trials": 3, "cpus_per_trial": 1, "holdout": 0.4, "confirm_top": 0,
                         "final_size_rungs": False})
    run = cli("search", "--space", space, "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = tmp_path / "results" / "ft"
    records = json.loads((results / "state" / "scheduler.json").read_text())["0.25"]
    history = pd.read_csv(results / "history.csv")
    assert len(records) == 3
    moved = 0
    for trial_id, value in records.items():
        acc = history[history.trial_id == trial_id].set_index("epoch")["accuracy"]
        assert value == pytest.approx(acc[3]), f"{trial_id} judged before its unfreeze"
        moved += acc[1] != acc[3]
        frozen = history[history.trial_id == trial_id].set_index("epoch")["frozen"]
        assert list(frozen)[:3] == [True, True, False]  # a trial stopped at the rung ends at epoch 3
    assert moved, "no trial's accuracy changed between epochs 1 and 3: the test could not tell"
    best = yaml.safe_load((results / "best.yaml").read_text())
    assert best["pretrained"] == str(weights)


def test_space_checks_freeze_epochs_against_the_least_epochs(image_folder, tmp_path):
    space = write_space(tmp_path / "bad.yaml", {**tiny(image_folder, pretrained=True, arch="test_resnet"),
                                                "epochs": {"randint": [1, 3]}, "freeze_epochs": {"choice": [0, 1]}})
    with pytest.raises(ConfigError, match="raise epochs' low end"):
        load_space(str(space))


def test_a_fine_tuned_model_loads_exports_and_predicts_without_its_starting_weights(image_folder, tmp_path,
                                                                                    timm_weights):
    """The weights a model started from may be gone: `load_model` rebuilds it empty with its saved statistics,
    and export and predict work on it."""
    from tune_sota import export

    start = tmp_path / "start.safetensors"
    shutil.copy(timm_weights, start)
    cfg = Config(**tiny(image_folder, arch="test_resnet", pretrained=str(start), epochs=2))
    learn = recipe.train(cfg)
    folder = model.save(learn, cfg, tmp_path / "ft", recipe.score(learn, tta=False))
    start.unlink()
    loaded = model.load_model(folder)
    assert recipe.data.stats_of(loaded.dls)[0] == pytest.approx([0.5] * 3), "test_resnet's statistics, as trained"
    assert recipe.score(loaded, tta=False)["accuracy"] == pytest.approx(recipe.score(learn, tta=False)["accuracy"])
    out = export.export(folder, tmp_path / "export")
    files = export.images([image_folder / "val" / "red"])
    probs, classes = export.predict(export.load(out), files)
    assert probs.shape == (len(files), 3) and classes == ["blue", "green", "red"]
    assert json.loads((out / "classes.json").read_text())["mean"] == pytest.approx([0.5] * 3)


def _hub_cache(home, weights) -> None:
    """A Hugging Face cache under `home` holding test_resnet's published file, laid out as the hub client
    writes it (refs/main -> snapshots/REV/model.safetensors)."""
    repo = home / "hub" / "models--timm--test_resnet.r160_in1k"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    shutil.copy(weights, repo / "snapshots" / rev / "model.safetensors")


@pytest.mark.slow
def test_pretrained_true_reads_the_cache_in_every_trial(image_folder, tmp_path, timm_weights):
    """`pretrained: true` with the published file in the cache: a real search whose trials load it offline."""
    _hub_cache(tmp_path / "hf", timm_weights)
    space = write_space(tmp_path / "hub.yaml", tiny(image_folder, arch="test_resnet", pretrained=True, epochs=2),
                        {"num_samples": 1, "cpus_per_trial": 1, "holdout": 0.2, "confirm_top": 0})
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE")}
    os.environ.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    try:
        run = cli("search", "--space", space, "--results", tmp_path / "results", timeout=600)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "results" / "hub" / "trials.csv")
    assert list(trials["status"]) == ["completed"], trials.to_string()


def test_a_relative_pretrained_path_is_read_from_the_space_files_folder(image_folder, tmp_path, timm_weights):
    (tmp_path / "spaces").mkdir()
    shutil.copy(timm_weights, tmp_path / "w.safetensors")
    space = write_space(tmp_path / "spaces" / "ft.yaml",
                        tiny(image_folder, arch="test_resnet", pretrained="../w.safetensors"))
    assert load_space(str(space)).values["pretrained"] == str(tmp_path / "w.safetensors")
    assert load_space(str(space)).fixed().frozen_epochs == 1, "fastai's default: one epoch of the head alone"


def test_weights_of_another_model_stop_a_search_before_ray(image_folder, tmp_path, timm_weights):
    """A weights file that does not fit the arch is one line before Ray starts, not an error in every trial."""
    wide = tmp_path / "wide.pth"
    torch.save(recipe.make_model(Config(**tiny(image_folder, width=0.25)), 3).state_dict(), wide)
    for arch, weights, says in (("xresnet18", wide, "does not fit this XResNet"),
                                ("test_convnext", timm_weights, "does not load into test_convnext")):
        space = write_space(tmp_path / "bad.yaml", tiny(image_folder, arch=arch, pretrained=str(weights)))
        run = cli("search", "--space", space, "--results", tmp_path / "results", timeout=120)
        err = run.stderr.strip()
        assert run.returncode == 2 and len(err.splitlines()) == 1 and says in err, run.stdout[-2000:] + err
        assert "Traceback" not in run.stdout + run.stderr and not (tmp_path / "results").exists()
