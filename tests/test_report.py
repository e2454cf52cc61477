"""Seeing a search: the report in a real headless Chromium with the network off, the Optuna study on
disk, MLflow through Ray's logger callback, optuna-dashboard, and reports for folders from older versions.
One real search (tiny data, real Ray, fastai, Optuna, MLflow) is shared by the tests that read it."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, cli, write_space
from tune_sota import load_history, load_trials, report
from tune_sota.cli import main


def run_main(capsys, *argv) -> tuple[int, str]:
    """`tune-sota ARGV` in-process; the exit code and what it printed to stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tune-sota: error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]


def chromium() -> str:
    """The headless browser, or skip (CI's .ci/run installs Debian's chromium)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary here (apt-get install chromium; CI's .ci/run installs it)")


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open `page` from file:// in headless Chromium with every host unresolvable and a proxy to nowhere."""
    return subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         "--virtual-time-budget=20000", "--window-size=1280,1800", *extra, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)


def rendered_charts(dom: str) -> dict[str, int]:
    """plotly's SVG roots (`main-svg`) inside each `chart-KEY` div of the DOM after the page's scripts ran."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="chart-(\w+)"', dom)]
    counts = {}
    for i, (at, key) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(dom)
        counts[key] = len(re.findall(r'<svg[^>]*class="main-svg"', dom[at:end]))
    return counts


def assert_renders_offline(folder: Path, tmp_path: Path, screenshot: Path | None = None) -> str:
    page = folder / "report.html"
    text = page.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text), "the page loads nothing from outside"
    _, expected = report.html_page(report.load(folder))
    run = browse(page, tmp_path / "profile", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    counts = rendered_charts(run.stdout)
    assert set(counts) == set(expected), (counts, expected)
    assert all(n >= 1 for n in counts.values()), f"charts that did not render: {counts}"
    if screenshot is not None:
        shot = browse(page, tmp_path / "profile", f"--screenshot={screenshot}")
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return run.stdout


@pytest.mark.slow
def test_search_writes_report_and_figures(searched):
    folder, run = searched
    assert f"report: {folder / 'report.html'}" in run.stdout
    page = (folder / "report.html").read_text()
    assert "The answer" in page and page.count("Plotly.newPlot") >= 4
    assert "Verdict: " in page and "95% interval" in page and "Selection noise: a holdout accuracy" in page
    for name in ("best_so_far", "learning_curves", "accuracy_vs_cost", "importance"):
        with Image.open(folder / "figures" / f"{name}.png") as img:
            assert img.size[0] > 300 and len(img.getcolors(1 << 16) or range(300)) > 20, name  # drawn, not blank
    trials = load_trials(folder)
    assert all(tid in page for tid in trials.trial_id), "every trial is in the table"


@pytest.mark.slow
def test_progress_lines_show_best_elapsed_and_time_left(searched):
    _, run = searched
    epoch = [line for line in run.stdout.splitlines() if line.startswith("  epoch  ")]
    done = [line for line in run.stdout.splitlines() if re.match(r"  \[\d+/8\] ", line)]
    assert epoch and all(re.search(r"\| best \d\.\d{4}  \d\dh\d\dm\d\ds$", line) for line in epoch), epoch[:3]
    assert len(done) == 8 and all(" elapsed" in line for line in done), done
    assert all(re.search(r", ~\d\dh\d\dm\d\ds left$", line) for line in done[:-1]), done
    best = max(float(re.search(r"accuracy (\d\.\d+)", line).group(1)) for line in epoch)
    assert f"best {best:.4f}" in epoch[-1] or f"best {best:.4f}" in done[-1]


@pytest.mark.slow
def test_report_renders_offline_in_chromium(searched, tmp_path):
    folder, _ = searched
    shot = Path("/tmp") / "tune_sota_report.png"  # outside git, to look at by eye
    dom = assert_renders_offline(folder, tmp_path, screenshot=shot)
    best = yaml.safe_load((folder / "best.yaml").read_text())["result"]
    assert "The answer" in dom and str(best["trial_id"]) in dom
    trials = load_trials(folder)
    assert ("stopped by ASHA" in dom) == (trials.status == "stopped").any()


@pytest.mark.slow
def test_study_on_disk_holds_every_ray_trial(searched):
    folder, _ = searched
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{folder / 'study.db'}")
    trials = load_trials(folder).set_index("trial_id")
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert sorted(by_ray) == sorted(trials.index) and len(study.trials) == len(trials)
    want = {"completed": "COMPLETE", "stopped": "PRUNED", "diverged": "FAIL", "error": "FAIL"}
    history = load_history(folder)
    for tid, t in by_ray.items():
        assert t.state.name == want[trials.loc[tid, "status"]], tid
        assert len(t.intermediate_values) == (history.trial_id == tid).sum(), "one intermediate value per epoch"


@pytest.mark.slow
def test_mlflow_has_a_run_per_trial_matching_history(searched):
    import mlflow

    folder, _ = searched
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    history = load_history(folder)
    trials = load_trials(folder)
    assert len(runs) == len(trials)
    for tid in trials.trial_id:
        (run,) = [r for name, r in runs.items() if name.endswith(tid)]
        logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "accuracy"), key=lambda m: m.step)]
        assert logged == pytest.approx(list(history[history.trial_id == tid].sort_values("epoch").accuracy)), tid
        assert run.info.status == "FINISHED"
    assert not (ROOT / "mlruns").exists() and not (ROOT / "mlartifacts").exists(), "nothing left in the checkout"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_answers_on_localhost_then_stops(searched):
    folder, _ = searched
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tune_sota.cli", "dashboard", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 90, None
        while time.monotonic() < deadline and body is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert body is not None, f"no answer on 127.0.0.1:{port}; exit {proc.poll()}"
        assert '"e2e"' in body, body[:500]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out
    with pytest.raises(OSError):  # stopped: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


@pytest.mark.slow
def test_report_rebuilds_an_old_style_folder(searched, tmp_path, capsys):
    folder, _ = searched
    old = tmp_path / "old"
    old.mkdir()
    for name in ("space.yaml", "run.yaml", "trials.csv", "history.csv"):
        shutil.copy(folder / name, old / name)
    best = yaml.safe_load((folder / "best.yaml").read_text())
    best["result"] = {k: best["result"].get(k) for k in ("accuracy", "tta_accuracy", "trial_id")}  # the old block
    (old / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    space = yaml.safe_load((old / "space.yaml").read_text())
    space["search"] = {"num_samples": 5, "grace_period": 1}  # a retired key: the report must not care
    (old / "space.yaml").write_text(yaml.safe_dump(space))
    run = cli("report", old)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (old / "study.db").exists(), "the report never creates a study"
    page = (old / "report.html").read_text()
    assert "No Optuna study in this folder" in page and "The answer" in page
    _, charts = report.html_page(report.load(old))
    assert {"best_so_far", "curves", "parallel", "cost"} <= set(charts) and "importance" not in charts
    if shutil.which("chromium"):
        assert_renders_offline(old, tmp_path)
    code, err = run_main(capsys, "dashboard", old)
    assert_one_line_error(code, err, "has no study.db")


def test_report_of_a_folder_that_is_not_one(tmp_path, capsys, caplog):
    code, err = run_main(capsys, "report", tmp_path)
    assert_one_line_error(code, err, "is not a results folder")
    with caplog.at_level(logging.WARNING, logger="tune_sota"):
        assert report.write_quietly(tmp_path, out=lambda line: None) is None  # a search would go on
    assert "could not be written" in caplog.text


def test_log_option_mistakes_are_one_line(tmp_path, capsys):
    space = write_space(tmp_path / "s.yaml", {"epochs": 1})
    code, err = run_main(capsys, "search", "--space", space, "--results", tmp_path / "r", "--log", "tensorboard")
    assert_one_line_error(code, err, "--log tensorboard", "use mlflow")
    try:
        import wandb  # noqa: F401
    except ImportError:
        code, err = run_main(capsys, "search", "--space", space, "--results", tmp_path / "r", "--log", "wandb")
        assert_one_line_error(code, err, "pip install")
    assert not (tmp_path / "r").exists(), "nothing written"
