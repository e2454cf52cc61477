"""Fixtures: a small image-folder dataset the tests make themselves, and tiny configs and spaces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("red", "green", "blue")


def make_image_folder(root: Path, per_class=(12, 6), px=24, seed=0, tint=120, cast=0) -> Path:
    """train/ and val/ with one folder per class: noisy images tinted by class, so a model can learn. A fainter
    `tint` under a random colour `cast` per image (up to `cast` in each channel) leaves some images ambiguous, so
    no model scores 100%."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 120, (px, px, 3)) + rng.integers(0, cast + 1, 3)
                img[..., c] += tint
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "tinted")


@pytest.fixture(scope="session")
def slower_folder(tmp_path_factory) -> Path:
    """Enough images that an epoch takes a fraction of a second (0.3 s on a 2-core CI box): give a test that
    loses a node, or interrupts, mid-trial enough epochs (the cluster, fault and resume tests share it)."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "bigger", per_class=(80, 10), px=32)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids (its hook runs last)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2`, as pyproject.toml sets), a costly shared fixture is built once, not once per
    worker: the tests that read the one shared search run in one worker, and so do a module's tests that share
    a module-scoped fixture (a search, a trained model, a cluster)."""
    for item in items:
        if "searched" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("searched"))
            continue
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})  # pytest's, read-only
        # a module's own session-scoped fixture too: a module-scoped one is torn down and built again when
        # another module's test runs between two of its tests on that worker (seen once in CI: 44 s twice)
        if any(d and (d[-1].scope == "module" or (d[-1].scope == "session" and d[-1].baseid.endswith(".py")))
               for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    os.environ["TUNE_SOTA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def tiny(image_folder: Path, **over) -> dict:
    """A config small enough to train in seconds on one CPU."""
    return {"data": str(image_folder), "arch": "xresnet18", "width": 0.125, "size": 16, "presize": 20,
            "batch_size": 8, "epochs": 2, "lr": 3e-3, **over}


def write_space(path: Path, values: dict, search: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({**values, "search": search or {}}, sort_keys=False))
    return path


def cli(*args, cwd=ROOT, timeout=900) -> subprocess.CompletedProcess:
    """Run `tune-sota ARGS` as a user would, capturing its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "tune_sota.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


ALL_FIVE = {
    "lr": {"loguniform": [1.0e-5, 5.0e-2]},  # wide, so that ASHA has clearly weak trials to stop
    "epochs": {"randint": [2, 4]},
    "mixup": {"choice": [0.0, 0.4]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "resize": {"choice": ["16", "8>16"]},
}


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """One real search through the CLI (all five of chapter 7's dimensions, ASHA, a holdout, confirmation,
    MLflow logging), shared by every test that reads a search's outputs: tests/test_search.py, test_report.py.

    Its own folder: a 36-image holdout tells a trial that has learned from one at chance by the rung. On the tiny
    folder's 7-image holdout the trials sometimes all tied at chance there, ASHA stopped none, and the three tests
    that need a stopped trial failed. Its faint tint under a colour cast keeps every model short of 100% on val/,
    so the confirmation's interval has a width. One rung at half of the (held) 4 epochs keeping the better half:
    4 of 8 stopped in each of 4 runs by hand, so there are stopped trials and the 2 completed ones that the
    selection noise needs (a 25% rung keeping a quarter once left 1 completed).
    """
    tmp = tmp_path_factory.mktemp("search")
    data = make_image_folder(tmp / "cast", per_class=(60, 10), px=32, tint=50, cast=100)
    space = write_space(tmp / "e2e.yaml", {**tiny(data), **ALL_FIVE},
                        {"num_samples": 8, "max_concurrent": 2, "grace": 0.5, "reduction_factor": 2,
                         "final_size_rungs": False,  # judged at the rung even while an 8>16 trial is at 8 px
                         "startup_trials": 3, "cpus_per_trial": 1, "holdout": 0.2, "confirm_top": 1,
                         "confirm_seeds": 2})
    run = cli("search", "--space", space, "--results", tmp / "results", "--log", "mlflow")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp / "results" / "e2e", run
