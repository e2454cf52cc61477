"""Your data in, a model out: data without val/ and tables of labels (sources.split_view), a model exported
for plain fastai and torch.export and loaded where neither tune_sota nor the data is, `tune-sota predict`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import CLASSES, cli, make_image_folder, tiny

from tune_sota import export, model, preflight, recipe, sources
from tune_sota.cli import main
from tune_sota.config import Config, load_space, parse_space, space_to_yaml


def class_folders(root: Path, per_class: int = 20) -> Path:
    """A folder of class folders and nothing else (no train/, no val/): how most people hold images."""
    make_image_folder(root / "tmp", per_class=(per_class, 0))
    for c in CLASSES:
        shutil.move(root / "tmp" / "train" / c, root / c)
    shutil.rmtree(root / "tmp")
    return root


def labels_table(root: Path, per_class: int = 10, **cols) -> Path:
    """images/ (flat, no class folders) and labels.csv with fastai's column names (fname, label, is_valid)."""
    src = make_image_folder(root / "src", per_class=(per_class, 0))
    (root / "images").mkdir()
    rows = []
    for c in CLASSES:
        for i, f in enumerate(sorted((src / "train" / c).iterdir())):
            shutil.move(f, root / "images" / f.name)
            rows.append({"fname": f.name, "label": c, "is_valid": i % 5 == 0})
    shutil.rmtree(src)
    frame = pd.DataFrame(rows).rename(columns=cols)
    frame.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def test_a_folder_without_val_is_split_stratified_the_same_every_time(tmp_path):
    root = class_folders(tmp_path / "pets", per_class=20)
    view = sources.prepare_source(str(root))
    found = sources.scan(view)
    assert found.classes == sorted(CLASSES)
    val_per_class = np.bincount([y for _, y in found.splits["val"]])
    assert val_per_class.tolist() == [4, 4, 4]  # valid_pct 0.2 of each class, as fastai's default
    assert len(found.splits["train"]) == 48
    record = pd.read_csv(view / "split.csv")
    assert (record.split == "val").sum() == 12 and set(record.label) == set(CLASSES)
    # The same split on every call (the confirmation's val/ is the same every run), and a new one for a new pct
    assert sources.prepare_source(str(root)) == view
    other = sources.prepare_source(sources.data_value({"folder": str(root), "valid_pct": 0.5}))
    assert other != view and (pd.read_csv(other / "split.csv").split == "val").sum() == 30
    # a class folder named train/ alone is read as the class root too
    (tmp_path / "t").mkdir()
    shutil.copytree(root, tmp_path / "t" / "train", symlinks=True)
    assert len(sources.scan(sources.prepare_source(str(tmp_path / "t"))).splits["val"]) == 12


def test_a_table_of_labels_uses_its_validity_column_and_round_trips_through_yaml(tmp_path):
    table = labels_table(tmp_path)
    (tmp_path / "space.yaml").write_text("data: {csv: labels.csv, folder: images}\narch: xresnet18\n")
    space = load_space(str(tmp_path / "space.yaml"))
    data = space.values["data"]
    assert sources.parse_data(data) == sources.DataSpec(csv=str(table), folder=str(tmp_path / "images"))
    found = preflight.check_data(data)
    assert len(found.splits["val"]) == 6 and len(found.splits["train"]) == 24  # is_valid: every 5th row
    # best.yaml holds the same value and reads back the same (config -> YAML -> config)
    again = parse_space(yaml.safe_load(space_to_yaml(Config(data=data).to_dict())))
    assert again.values["data"] == data
    # without a validity column: a stratified 20%; other column names through fn_col / label_col
    t2 = labels_table(tmp_path / "b", fname="file", label="kind")
    pd.read_csv(t2).drop(columns="is_valid").to_csv(t2, index=False)
    spec = {"csv": str(t2), "folder": str(tmp_path / "b" / "images"), "fn_col": "file", "label_col": "kind"}
    found = preflight.check_data(sources.data_value(spec))
    assert np.bincount([y for _, y in found.splits["val"]]).tolist() == [2, 2, 2]


def _bad_tables():
    def missing_file(t):
        pd.read_csv(t).assign(fname=lambda f: f.fname.where(f.index > 0, "nope.png")).to_csv(t, index=False)

    def one_class(t):
        pd.read_csv(t).assign(label="red").to_csv(t, index=False)

    def not_boolean(t):
        pd.read_csv(t).assign(is_valid="maybe").to_csv(t, index=False)

    def unknown_column(t):
        pd.read_csv(t).rename(columns={"label": "class"}).to_csv(t, index=False)

    return {
        "missing_file": (missing_file, {}, ["1 of 30 files named in labels.csv are not in", "nope.png"]),
        "unknown_column": (unknown_column, {}, ["labels.csv has no column 'label' (label_col)", "its columns: fname"]),
        "one_class": (one_class, {}, ["has 1 class (red)", "at least 2"]),
        "not_boolean": (not_boolean, {}, ["column is_valid must be true/false", "'maybe'"]),
        "missing_table": (lambda t: t.unlink(), {}, ["csv", "labels.csv does not exist"]),
        "unknown_key": (lambda t: None, {"valid_column": "x"}, ["unknown key 'valid_column'", "valid_col"]),
    }


@pytest.mark.parametrize("case", _bad_tables(), ids=str)
def test_bad_tables_are_one_line_errors_before_anything_runs(case, tmp_path):
    mutate, extra, fragments = _bad_tables()[case]
    table = labels_table(tmp_path)
    mutate(table)
    space = {**tiny(tmp_path), "data": {"csv": "labels.csv", "folder": "images", **extra}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    run = cli("search", "--space", tmp_path / "s.yaml", "--results", tmp_path / "results", timeout=120)
    err = run.stderr.strip()
    assert run.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, run.stderr
    for f in fragments:
        assert f in err, err
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on a table of labels through the cached pipeline, saved as `tune-sota train` does."""
    tmp = tmp_path_factory.mktemp("trained")
    labels_table(tmp / "data", per_class=12)
    data = sources.data_value({"csv": str(tmp / "data" / "labels.csv"), "folder": str(tmp / "data" / "images")})
    cfg = Config(**tiny(tmp, data=data, epochs=3))
    learn = recipe.train(cfg, cpus=1)
    return model.save(learn, cfg, tmp / "model", recipe.score(learn, tta=False)), tmp / "data"


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """`tune-sota ARGV` in this process: the exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    said = capsys.readouterr()
    return code, said.out, said.err


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained model exported once through the CLI, for the predict and the plain-fastai tests."""
    out = tmp_path_factory.mktemp("exported") / "exp"
    run = cli("export", trained[0], "--out", out, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_predict_a_folder_prints_a_line_per_image_and_writes_a_csv(trained, exported, tmp_path, capsys):
    """(Before the export test below, which deletes the training data.) The first prediction goes through the
    command as a user types it; the others call the same `main` in this process (each subprocess imports torch)."""
    saved, data_dir = trained
    images = tmp_path / "photos" / "nested"
    images.mkdir(parents=True)
    for f in sorted((data_dir / "images").iterdir())[:4]:
        shutil.copy(f, images / f.name)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    shown = cli("predict", exported, tmp_path / "photos", "--top", "2", timeout=300)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = [line.split("\t") for line in shown.stdout.strip().splitlines()]
    assert len(lines) == 4 and all(len(x) == 4 for x in lines), shown.stdout
    assert {x[1] for x in lines} <= set(CLASSES) and all(0 < float(x[2]) <= 1 for x in lines)
    assert all(len(x[3].split()) == 2 and x[3].split()[0].startswith(x[1] + ":") for x in lines)
    # the saved model itself (load_model's way, with the data there) predicts the same labels
    code, out, err = run_main(capsys, "predict", saved, tmp_path / "photos", "--top", "2")
    assert code == 0, err
    assert [x.split("\t")[:2] for x in out.strip().splitlines()] == [x[:2] for x in lines]
    code, _, err = run_main(capsys, "predict", exported, *sorted(images.iterdir()), "--out", tmp_path / "p.csv",
                            "--tta")
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "p.csv")
    assert list(frame.columns) == ["path", "label", "probability", "top"] and len(frame) == 4
    code, _, err = run_main(capsys, "predict", exported, images, "--out", tmp_path / "p.csv")
    assert code == 2 and "exists" in err  # nothing is overwritten


# Run where tune_sota cannot be imported (a stand-in module that refuses), from an empty folder.
LOADER = textwrap.dedent("""
    import sys, json
    sys.modules["tune_sota"] = None  # any pickle that needs tune_sota fails to load
    import numpy as np, torch
    from PIL import Image
    from fastai.learner import load_learner
    folder, images = sys.argv[1], sys.argv[2:]
    learn = load_learner(f"{folder}/export.pkl")
    with learn.no_bar(), learn.no_logging():
        fastai_probs = learn.get_preds(dl=learn.dls.test_dl(images))[0]
    label = learn.predict(images[0])[0]
    meta = json.load(open(f"{folder}/classes.json"))
    program = torch.export.load(f"{folder}/model.pt2").module()
    def square(f, px):
        im = Image.open(f).convert("RGB"); w, h = im.size; s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((px, px), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()).float() / 255
    program_probs = program(torch.stack([square(f, meta["presize"]) for f in images]))
    print(json.dumps({"fastai": fastai_probs.tolist(), "program": program_probs.tolist(), "label": str(label),
                      "vocab": [str(c) for c in learn.dls.vocab], "classes": meta["classes"],
                      "tune_sota": "tune_sota" in sys.modules and sys.modules["tune_sota"] is not None}))
""")


def test_an_export_loads_with_plain_fastai_and_torch_without_tune_sota_or_the_data(trained, exported, tmp_path):
    saved, data_dir = trained
    assert {p.name for p in exported.iterdir()} == {"export.pkl", "model.pt2", "classes.json"}
    assert not export._tune_sota_names(exported / "export.pkl")
    # Reference predictions from load_model (which needs the data), on images copied out of the data
    images = tmp_path / "new"
    images.mkdir()
    for f in sorted((data_dir / "images").iterdir())[::5]:
        shutil.copy(f, images / f.name)
    files = sorted(str(p) for p in images.iterdir())
    learn = model.load_model(saved)
    reference = learn.get_preds(dl=learn.dls.test_dl(files))[0]
    # ...then the data goes, and a fresh interpreter that cannot import tune_sota loads the export
    shutil.rmtree(data_dir)
    shutil.rmtree(sources.cache_dir() / "decoded", ignore_errors=True)
    shutil.rmtree(sources.cache_dir() / "splits", ignore_errors=True)
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", LOADER, str(exported), *files], cwd=tmp_path / "empty",
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["tune_sota"]
    assert got["vocab"] == got["classes"] == list(learn.dls.valid.dataset.vocab)
    assert torch.allclose(torch.tensor(got["fastai"]), reference, atol=1e-4)
    assert torch.allclose(torch.tensor(got["program"]), reference, atol=1e-4)
    assert got["label"] == got["vocab"][int(reference[0].argmax())]
