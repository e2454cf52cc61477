"""Multi-label data (lesson 3's Planet): a table whose label column holds several labels per image, searched
end to end with a real search (Ray, Optuna, fastai), its threshold fitted on the holdout, exported and predicted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import cli, tiny, write_space
from tests.test_cli import assert_one_line_error, run_main
from tune_sota import export, load_model, load_trials, recipe
from tune_sota.config import Config, ConfigError, parse_space
from tune_sota.sources import data_value

LABELS = ("red", "green", "blue")
LABELS_SORTED = sorted(LABELS)  # the vocabulary's order


def make_multilabel_table(root: Path, n: int = 90, px: int = 32, seed: int = 0) -> Path:
    """Planet's layout as fastai's PLANET_TINY has it: labels.csv (image_name without its .jpg, tags joined
    by a space) and train/NAME.jpg. Each image shows a bright square of each colour it is labelled with,
    one to three of them, on a dark noisy ground."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        present = [c for c in range(3) if rng.random() < 0.5] or [int(rng.integers(3))]
        img = rng.integers(0, 90, (px, px, 3), dtype=np.uint8)
        for c in present:
            y, x = rng.integers(0, px - 12, 2)
            img[y:y + 12, x:x + 12, c] = 255
        Image.fromarray(img).save(root / "train" / f"train_{i:03d}.jpg", quality=95)
        rows.append({"image_name": f"train_{i:03d}", "tags": " ".join(LABELS[c] for c in present)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def _data(table: Path) -> dict:
    """The table as a data mapping, as lesson 3 reads Planet: fastai's from_csv(folder='train', suff='.jpg',
    label_delim=' ')."""
    return {"csv": str(table), "folder": str(table.parent / "train"), "fn_col": "image_name", "label_col": "tags",
            "label_delim": " ", "suff": ".jpg"}


@pytest.fixture(scope="session")  # built once: its tests are kept on one worker (conftest)
def multi_search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    make_multilabel_table(tmp / "planet_tiny")
    # `data: planet_tiny`, fastai's download, found where an earlier download went (sources._download): the
    # product's own path for it, with the table made here (no network)
    record = Path(os.environ["TUNE_SOTA_CACHE"]) / "downloads" / "planet_tiny.path"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(str(tmp / "planet_tiny"))
    space = write_space(tmp / "tags.yaml", {**tiny(tmp, data="planet_tiny", size=32, presize=32, epochs=4),
                                            "lr": {"loguniform": [3e-3, 3e-2]}},
                        {"num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1, "scheduler": "fifo",
                         "holdout": 0.2, "confirm_top": 1, "confirm_seeds": 1})
    run = cli("search", "--space", space, "--results", tmp / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp / "results" / "tags", run.stdout


def test_a_multi_label_table_is_searched_with_a_fitted_threshold(multi_search):
    folder, out = multi_search
    assert "multi-label: every accuracy figure is F2 averaged per image" in out, out[-3000:]
    trials = load_trials(folder)
    done = trials[trials.status == "completed"]
    assert len(done) == 2, trials
    # each trial was judged at 0.5 (accuracy) and fitted its own threshold on its holdout after training,
    # which is 0.5 or better there (0.5 is one of the thresholds tried)
    assert set(done.threshold) <= {float(t) for t in recipe.THRESHOLDS}, done.threshold
    assert (done.fitted_accuracy >= done.accuracy - 1e-9).all(), done[["accuracy", "fitted_accuracy"]]
    # the fitted threshold is the best one on the trial's holdout: the trial's own checkpoint, reloaded
    best = yaml.safe_load((folder / "best.yaml").read_text())
    winner = done.set_index("trial_id").loc[best["result"]["trial_id"]]
    learn = load_model(winner.path, cpus=1)
    assert learn.config.holdout == pytest.approx(0.2) and learn.multi_metric == "f2"
    probs, targs = learn.get_preds(dl=learn.dls.valid)
    at = {round(t, 2): recipe.multi_score("f2", probs, targs, t) for t in np.arange(0.05, 0.951, 0.01)}
    assert at[round(winner.threshold, 2)] == pytest.approx(winner.fitted_accuracy, abs=1e-6)
    assert winner.fitted_accuracy == pytest.approx(max(at.values()), abs=1e-9), at
    assert at[0.5] == pytest.approx(winner.accuracy, abs=1e-6)  # what the trial was judged by
    # best.yaml, the confirmation and the export go on with that threshold, not the judging one
    assert best["threshold"] == pytest.approx(winner.threshold)
    assert "fitted on its holdout" in best["result"]["metric"]
    confirmed = load_model(folder / "best.yaml", cpus=1)
    assert confirmed.threshold == pytest.approx(winner.threshold)
    scored = recipe.score(confirmed, tta=False)["accuracy"]
    assert scored == pytest.approx(best["result"]["accuracy"], abs=1e-6)
    probs, targs = confirmed.get_preds(dl=confirmed.dls.valid)
    assert targs.shape[1] == 3 and set(targs.unique().tolist()) <= {0.0, 1.0}
    assert scored == pytest.approx(recipe.multi_score("f2", probs, targs, winner.threshold), abs=1e-6)
    assert "Multi-label: every accuracy figure is F2" in (folder / "report.html").read_text()
    runs = pd.read_csv(folder / "confirm.csv")
    assert runs.tta_accuracy.between(0, 1).all() and runs.accuracy.between(0, 1).all(), runs


def test_the_export_and_predict_give_every_label_above_the_threshold(multi_search, tmp_path):
    folder, _ = multi_search
    best = yaml.safe_load((folder / "best.yaml").read_text())
    about = json.loads((folder / "export" / "classes.json").read_text())
    assert about["multi_label"] is True and about["classes"] == sorted(LABELS)
    assert about["threshold"] == pytest.approx(best["threshold"])
    images = sorted((folder.parent.parent / "planet_tiny" / "train").glob("*.jpg"))[:12]
    learn = export.load(folder / "export")
    assert export.threshold(learn) == pytest.approx(best["threshold"])
    probs, classes = export.predict(learn, images)
    assert probs.shape == (12, 3) and not torch.allclose(probs.sum(1), torch.ones(12)), probs  # not a softmax
    # the serving program gives the same probabilities
    program = torch.export.load(folder / "export" / "model.pt2").module()
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for p in images])
    assert torch.allclose(program(pixels), probs, atol=2e-3), (program(pixels), probs)
    run = cli("predict", folder / "export", *images)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split("\t") for line in run.stdout.strip().splitlines()]
    assert len(lines) == 12
    for (path, labels, shown), p in zip(lines, probs):
        above = {c for c, v in zip(classes, p) if v > best["threshold"]}
        assert set(labels.split()) == above, (path, labels, p)
        assert {s.split(":")[0] for s in shown.split()} == above
    out = tmp_path / "preds.csv"
    assert cli("predict", folder / "export", *images, "--out", out).returncode == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["path", "labels", "probabilities", "threshold"] and len(frame) == 12
    assert [r[1] for r in lines] == list(frame.labels)


def test_multi_score_is_scikit_learns_f2_per_image_and_fastais_accuracy_multi():
    from fastai.metrics import accuracy_multi
    from sklearn.metrics import fbeta_score

    g = torch.Generator().manual_seed(0)
    probs, targs = torch.rand(200, 5, generator=g), (torch.rand(200, 5, generator=g) > 0.6).float()
    targs[0] = 0  # an image with no label (and, at a high threshold, none predicted): counts 1 in both
    for t in (0.2, 0.5, 0.9):
        want = fbeta_score(targs.numpy(), (probs > t).numpy(), beta=2, average="samples", zero_division=1)
        assert recipe.multi_score("f2", probs, targs, t) == pytest.approx(want, abs=1e-6)
        assert recipe.multi_score("accuracy_multi", probs, targs, t) == pytest.approx(
            float(accuracy_multi(probs, targs, thresh=t, sigmoid=False)), abs=1e-6)


def test_both_pipelines_read_a_multi_label_table_alike(tmp_path):
    table = make_multilabel_table(tmp_path / "t", n=40)
    truth = pd.read_csv(table).set_index("image_name").tags.str.split()
    got = {}
    for pipeline in ("cached", "fastai"):
        cfg = Config(**{**tiny(tmp_path, data=data_value(_data(table)), size=32, presize=32), "pipeline": pipeline,
                        "holdout": 0.2})
        assert cfg.multi_label
        dls = recipe.make_dataloaders(cfg, workers=0, device=torch.device("cpu"))
        assert list(dls.vocab) == sorted(LABELS)
        got[pipeline] = torch.stack([dls.valid_ds[i][1] for i in range(len(dls.valid_ds))]).float()
        x, y = dls.one_batch()
        assert y.shape == (cfg.batch_size, 3) and y.dtype == torch.float32
        assert isinstance(recipe.build_learner(cfg, dls).loss_func, recipe.BCEWithLogitsLossFlat)
        # MixUp mixes the 0/1 rows and label smoothing softens them: a fit with both trains and scores
        seen = []
        learn = recipe.train(Config(**{**cfg.to_dict(), "epochs": 1, "mixup": 0.4, "label_smoothing": 0.1}),
                             cpus=1, on_epoch=lambda r, _, seen=seen: seen.append(r))
        assert isinstance(learn.loss_func, recipe.SmoothedBCE) and np.isfinite(seen[-1].train_loss)
        assert 0 <= seen[-1].accuracy <= 1 and 0 <= recipe.score(learn)["tta_accuracy"] <= 1
    assert torch.equal(got["cached"], got["fastai"])  # the same holdout rows, the same 0/1 per label
    # and each row is an image's own labels (the fastai pipeline keeps the file names)
    dls = recipe.make_dataloaders(Config(**{**tiny(tmp_path, data=data_value(_data(table)), size=32, presize=32),
                                            "pipeline": "fastai", "holdout": 0.2}), workers=0,
                                  device=torch.device("cpu"))
    for item, y in zip(dls.valid.items, got["fastai"]):
        name = Path(item).stem
        assert {LABELS_SORTED[j] for j in torch.nonzero(y).flatten().tolist()} == set(truth[name]), name



def test_multi_label_mistakes_are_one_line(tmp_path, capsys):
    table = make_multilabel_table(tmp_path / "t", n=12)
    with pytest.raises(ConfigError, match="threshold is fitted on each trial's holdout"):
        parse_space({"data": _data(table), "threshold": {"uniform": [0.2, 0.6]}})
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"data": {"folder": str(tmp_path), "label_delim": " "}}))
    code, err = run_main(capsys, "search", "--space", tmp_path / "a.yaml", "--results", tmp_path / "r")
    assert_one_line_error(code, err, "label_delim splits a table's labels; it needs csv:")
    one = tmp_path / "t" / "one.csv"
    pd.DataFrame({"image_name": ["train_000", "train_001"], "tags": ["red", "red"]}).to_csv(one, index=False)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"data": {**_data(one)}}))
    code, err = run_main(capsys, "search", "--space", tmp_path / "b.yaml", "--results", tmp_path / "r")
    assert_one_line_error(code, err, "fewer than 2 labels split by label_delim ' '")
    assert not (tmp_path / "r").exists()
