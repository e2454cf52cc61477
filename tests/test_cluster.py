"""Clusters as users start them: real `ray start` processes on 127.0.0.1 with token authentication,
`tune-sota search --address` and `tune-sota cluster-check` against them, and local Ray that stays
local whatever cluster files are lying around. Every process a test starts is stopped by its own id."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, tiny, write_space

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp():
    """A Ray temp folder of the test's own (short: Ray's socket paths must stay under ~100 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tsc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str):
    err = run.stderr.strip()
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("tune-sota: error: "), err
    for f in fragments:
        assert f in err, err


def test_local_search_ignores_a_stale_cluster_file(ray_tmp):
    # What a `ray start` cluster that died leaves behind: the file naming it. A plain ray.init() would
    # retry that address for minutes; the search starts a Ray of its own instead.
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    code = ("import ray; from tune_sota import cluster; from tune_sota.config import SearchSettings\n"
            "ctx = cluster.connect(None, SearchSettings()); print('GCS', ctx.address_info['gcs_address'])\n"
            "ray.shutdown()")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    gcs = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("GCS "))
    assert gcs != dead and time.time() - t0 < 120


def test_auto_names_a_dead_cluster_in_one_line_within_seconds(ray_tmp, tmp_path, monkeypatch, image_folder):
    space = write_space(tmp_path / "s.yaml", tiny(image_folder))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = cli("search", "--space", space, "--address", "auto", "--results", tmp_path / "results", timeout=60)
    assert_one_line_error(run, "--address auto: no cluster was started with `ray start`", "ray start --head")

    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    t0 = time.time()
    run = cli("search", "--space", space, "--address", "auto", "--results", tmp_path / "results", timeout=60)
    assert_one_line_error(run, f"--address auto ({dead}): nothing answers there", "has stopped")
    assert time.time() - t0 < 30 and not (tmp_path / "results").exists()
