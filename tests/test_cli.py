"""Bad input gets one clear line, exit 2, no traceback, and nothing written; results are never lost;
nothing untrusted is deserialized."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import cli, make_image_folder, tiny, write_space
from tune_sota import recipe
from tune_sota.cli import main, search_description
from tune_sota.config import SPACES_DIR, Config, SearchSettings, write_atomic
from tune_sota.preflight import check_data
from tune_sota.schedule import rung_shares
from tune_sota.sources import load_rgb


def run_main(capsys, *argv) -> tuple[int, str]:
    """`tune-sota ARGV` in-process; the exit code and what it printed to stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune-sota: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def folder_with(tmp_path, name, mutate):
    root = make_image_folder(tmp_path / name, per_class=(4, 2), px=12)
    mutate(root)
    return root


BAD_SPACES = {
    "broken_yaml": ("lr: [0.1, 0.2\nepochs: 3\n", ["broken YAML at line"]),
    "unknown_key": ("lr: 0.01\nmixupp: 0.2\n", ["unknown key 'mixupp'", "allowed: data, arch"]),
    "wrong_type": ("epochs: five\n", ["epochs: 'five' is not an integer"]),
    "empty_range": ("lr: {uniform: [0.01, 0.01]}\n", ["range [0.01, 0.01] is empty"]),
    "inverted_range": ("lr: {loguniform: [0.1, 0.001]}\n", ["range [0.1, 0.001] is empty"]),
    "empty_choice": ("mixup: {choice: []}\n", ["choice needs a non-empty list"]),
    "unknown_distribution": ("mixup: {beta: [1, 2]}\n", ["unknown distribution 'beta'"]),
    "retired_grace_period": ("epochs: 3\nsearch: {grace_period: 5}\n", ["grace_period (epochs) is now search.grace"]),
    "grace_out_of_range": ("search: {grace: 1.5, reduction_factor: 2}\n", ["search.grace: 1.5 is not allowed",
                                                                          "must be in [0.01, 0.99]"]),
    "old_score_top_is_confirm_top": ("search: {score_top: -1}\n", ["search.confirm_top: -1 is not allowed"]),
    "unknown_scheduler": ("search: {scheduler: hyperband}\n", ["scheduler: 'hyperband'", "one of asha, fifo"]),
    "not_a_mapping": ("- lr\n- epochs\n", ["a space is a mapping"]),
    "prior_outside_range": ("lr: {loguniform: [1.0e-3, 1.0e-2], prior: 0.5}\n",
                            ["lr: prior 0.5 is not allowed", "[0.001, 0.01]"]),
    "prior_not_a_choice": ("mixup: {choice: [0.0, 0.2], prior: 0.4, confidence: 0.5}\n",
                           ["mixup: prior 0.4 is not one of the choices: 0.0, 0.2"]),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=str)
def test_bad_space_files(case, tmp_path, capsys):
    text, fragments = BAD_SPACES[case]
    (tmp_path / "bad.yaml").write_text("data: digits\n" + text if not text.startswith("-") else text)
    code, err = run_main(capsys, "search", "--space", tmp_path / "bad.yaml", "--results", tmp_path / "results")
    assert_one_line_error(code, err, "bad.yaml", *fragments)
    assert not (tmp_path / "results").exists()


def _empty_class(root):
    for f in (root / "train" / "green").iterdir():
        f.unlink()


def _single_class(root):
    import shutil

    for c in ("green", "blue"):
        shutil.rmtree(root / "train" / c)
        shutil.rmtree(root / "val" / c)


def _all_unreadable(root):
    for f in root.rglob("*.png"):
        f.write_bytes(b"not an image at all")


BAD_DATA = {
    "class_without_images": (_empty_class, ["green has no images"]),
    "single_class": (_single_class, ["has 1 class folder(s)", "at least 2"]),
    "all_unreadable": (_all_unreadable, ["are unreadable", "fix or remove them"]),
}


def test_a_batch_bigger_than_the_training_images_is_an_error_before_ray(tmp_path, capsys):
    """12 training images (the holdout takes 3 more) and batch_size 64: not one batch would train."""
    root = make_image_folder(tmp_path / "few", per_class=(4, 2))
    space = write_space(tmp_path / "s.yaml", tiny(root, batch_size=64), {"holdout": 0.25})
    code, err = run_main(capsys, "search", "--space", space, "--results", tmp_path / "results")
    assert_one_line_error(code, err, "batch_size 64 but only 9 training images after holding out 25%",
                          "use batch_size 4 or less")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n"], ids=["empty", "comment", "empty_map"])
def test_a_space_that_sets_nothing_is_an_error(text, tmp_path, capsys):
    (tmp_path / "blank.yaml").write_text(text)
    code, err = run_main(capsys, "search", "--space", tmp_path / "blank.yaml", "--results", tmp_path / "results")
    assert_one_line_error(code, err, "blank.yaml", "the space sets nothing", "give at least `data:`")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("case", BAD_DATA, ids=str)
def test_bad_data_folders(case, tmp_path, capsys):
    mutate, fragments = BAD_DATA[case]
    root = folder_with(tmp_path, case, mutate)
    space = write_space(tmp_path / "s.yaml", tiny(root))
    code, err = run_main(capsys, "search", "--space", space, "--results", tmp_path / "results")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("argv,fragments", [
    (["search", "--space", "no_such_space"], ["no search space named 'no_such_space'", "available: ", "quick"]),
    (["search", "--space", "missing/space.yaml"], ["space file missing/space.yaml does not exist"]),
    (["search", "--num-samples", "0"], ["--num-samples 0 is not allowed; must be in [1, 100000]"]),
    (["search", "--num-samples", "-4"], ["--num-samples -4 is not allowed"]),
    (["search", "--num-samples", "lots"], ["argument --num-samples: invalid int value: 'lots'"]),
    (["search", "--cpus-per-trial", "0"], ["--cpus-per-trial 0.0 is not allowed"]),
    (["search", "--address", "127.0.0.1:1"], ["--address 127.0.0.1:1: nothing answers there", "ray start --head"]),
    (["search", "--address", "no-port-here"], ["expected HOST:PORT"]),
    (["search", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    (["search", "--resume", "--name", "never_ran"], ["holds no search to resume"]),
    (["train", "--config", SPACES_DIR / "quick.yaml"], ["still a distribution"]),
    (["trials", "no/such/results"], ["is not a results folder"]),
    ([], ["the following arguments are required: COMMAND"]),
])
def test_bad_command_lines(argv, fragments, tmp_path, capsys):
    if argv[:1] == ["search"]:
        argv = [*argv, "--results", tmp_path / "results"]
    code, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")
def test_gpus_asked_for_where_there_are_none(tmp_path, capsys, image_folder):
    space = write_space(tmp_path / "s.yaml", tiny(image_folder))
    code, err = run_main(capsys, "search", "--space", space, "--gpus-per-trial", "1", "--results", tmp_path / "r")
    assert_one_line_error(code, err, "gpus_per_trial 1 but this machine has no CUDA GPU", "--gpus-per-trial 0")
    assert not (tmp_path / "r").exists()


def test_one_line_error_end_to_end_without_traceback(tmp_path):
    """The same promise through the installed entry point, as a user meets it."""
    (tmp_path / "typo.yaml").write_text("data: digits\nlr: {loguniform: [0.1, 0.01]}\n")
    run = cli("search", "--space", tmp_path / "typo.yaml", "--results", tmp_path / "results")
    assert run.returncode == 2 and run.stdout == ""
    expected = f"{tmp_path / 'typo.yaml'}: lr: loguniform range [0.1, 0.01] is empty; low must be below high"
    assert run.stderr.strip().splitlines() == [f"tune-sota: error: {expected}"]


def test_help_explains_every_command():
    for argv, words in ((["--help"], ["search", "train", "trials", "examples:"]),
                        (["search", "--help"], ["--space", "--resume", "--address", "--storage", "default: quick"]),
                        (["train", "--help"], ["--config", "TTA", "best.yaml"]),
                        (["trials", "--help"], ["RESULTS_DIR", "--history", "load_trials"])):
        run = cli(*argv)
        assert run.returncode == 0 and run.stdout.startswith("usage: tune-sota"), run.stderr
        assert all(w in run.stdout for w in words), (argv, run.stdout)
        if argv[0] == "search":  # what ASHA and the confirmation do by default, as the defaults say
            d = SearchSettings()
            said = " ".join(run.stdout.split())
            share = rung_shares(d.grace, d.reduction_factor)[-1]
            assert f"at {share:.0%} of its own schedule" in said and "half-way" not in said, said
            assert f"top 1/{d.reduction_factor}" in said and f"with {d.confirm_seeds} seeds each" in said, said


def test_search_help_follows_the_settings_it_describes():
    text = search_description(SearchSettings(grace=0.25, reduction_factor=2, confirm_top=3, final_size_rungs=False))
    assert "at 25% and 50% of its own schedule, and stops" in text and "The best 3 configs" in text
    assert "final size" not in text


# --- data that is odd but usable -------------------------------------------------------------------

def _save_modes(folder):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (12, 12))).astype(np.uint16)).save(folder / "deep16.png")


def test_non_rgb_images_become_rgb(tmp_path):
    _save_modes(tmp_path)
    for f in tmp_path.iterdir():
        im = load_rgb(f)
        assert im.mode == "RGB" and im.size == (12, 12), f.name
    deep = np.asarray(load_rgb(tmp_path / "deep16.png"))
    assert 60 < deep.mean() < 200, "16-bit scaled to 8-bit, not clipped to white"


def test_a_few_unreadable_or_non_rgb_files_train_on_and_are_reported(tmp_path, capsys):
    root = make_image_folder(tmp_path / "mixed", per_class=(8, 3), px=16)
    for c in ("red", "green"):
        _save_modes(root / "train" / c)
    (root / "train" / "blue" / "broken.png").write_bytes(b"\x89PNG garbage")
    check_data(str(root), out=print)
    said = capsys.readouterr().out
    assert "skipping 1 unreadable image(s)" in said and "broken.png" in said
    reports = []
    learn = recipe.train(Config(**tiny(root, epochs=1)), cpus=1, on_epoch=lambda r, _: reports.append(r))
    modes = len(list((root / "train" / "red").glob("*"))) - 8  # the non-RGB files _save_modes wrote
    assert len(learn.dls.train.dataset) == 24 + 2 * modes, "every readable file, whatever its mode, is trained on"
    assert len(learn.dls.valid.dataset) == 9
    (r,) = reports
    assert np.isfinite(r.train_loss) and np.isfinite(r.valid_loss) and 0 <= r.accuracy <= 1


# --- nothing lost ----------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "best.yaml"
    write_atomic(target, "old: 1\n")
    with pytest.raises(TypeError):
        write_atomic(target, object())  # fails mid-write
    assert target.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["best.yaml"]


# --- security --------------------------------------------------------------------------------------

def test_yaml_cannot_construct_python_objects(tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = run_main(capsys, "search", "--space", tmp_path / "evil.yaml", "--results", tmp_path / "r")
    assert_one_line_error(code, err, "broken YAML")
    assert not marker.exists()


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_load_tensors_only(image_folder):
    learn = recipe.build_learner(Config(**tiny(image_folder)), recipe.make_dataloaders(
        Config(**tiny(image_folder)), workers=0, device=torch.device("cpu")))
    buf = io.BytesIO()
    torch.save({"model": learn.model.state_dict(), "opt": None, "epoch": 1, "extra": _Payload()}, buf)
    with pytest.raises(pickle.UnpicklingError):
        recipe.load_state(learn, buf.getvalue())
    assert recipe.load_state(learn, recipe.save_state(learn, 3)) == 3


def test_ray_dashboard_stays_off():
    import ray

    from tune_sota.cluster import connect

    context = connect(None, SearchSettings())
    try:
        assert not context.dashboard_url
    finally:
        ray.shutdown()


def test_a_dataset_downloaded_before_is_found_without_importing_fastai(tmp_path, image_folder):
    """The driver of every search prepares its data: an earlier download must not cost it torch and fastai."""
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "imagenette2-160.path").write_text(str(image_folder))
    code = ("import sys; from tune_sota.sources import prepare_source\n"
            "print(prepare_source('imagenette2-160'), 'fastai' in sys.modules, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TUNE_SOTA_CACHE": str(tmp_path)})
    assert run.stdout.split() == [str(image_folder), "False", "False"], run.stdout + run.stderr


def test_a_download_that_fails_for_another_reason_keeps_its_cause(tmp_path):
    """Only network failures get the offline hint; here fastai's own config file is broken."""
    (tmp_path / "fastai").mkdir()
    (tmp_path / "fastai" / "config.ini").write_text("not an ini file\n[[[\n")
    (tmp_path / "c.yaml").write_text("data: imagenette2-160\narch: xresnet18\nepochs: 1\n")
    env = {**os.environ, "FASTAI_HOME": str(tmp_path / "fastai"), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "tune_sota.cli", "train", "--config", tmp_path / "c.yaml"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "could not download imagenette2-160: MissingSectionHeaderError" in line and "without network" not in line


def test_results_that_is_a_file_is_one_line(tmp_path, capsys, image_folder):
    """`--results FILE` once ended in NotADirectoryError from deep inside the search."""
    afile = tmp_path / "afile.yaml"
    afile.write_text("lr: 0.01\n")
    space = write_space(tmp_path / "s.yaml", tiny(image_folder))
    code, err = run_main(capsys, "search", "--space", space, "--results", afile)
    assert_one_line_error(code, err, f"--results {afile} is a file")
    assert afile.read_text() == "lr: 0.01\n"


def test_trials_of_a_folder_no_search_wrote_is_one_line(tmp_path, capsys):
    """A folder without a search's files once got Ray's 'check if you specified the correct experiment path'."""
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("hello\n")
    for argv in (["trials", tmp_path / "stray"], ["trials", "--history", tmp_path / "stray"]):
        code, err = run_main(capsys, *argv)
        assert_one_line_error(code, err, "is not a results folder")
    # a search's folder that Ray never saved state in (stopped at once): one line too
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "space.yaml").write_text("lr: 0.01\n")
    (tmp_path / "early" / "run.yaml").write_text(f"experiment: {tmp_path / 'nowhere'}\n")
    code, err = run_main(capsys, "trials", tmp_path / "early")
    assert_one_line_error(code, err, "recorded no trial yet")
