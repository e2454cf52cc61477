"""`tune-sota gpu-check`: its advice from measured rounds, and the whole check on a machine without a
GPU (the CPU stand-in through real Ray with fractional CPUs)."""

from __future__ import annotations

import pytest

from tests.conftest import cli
from tune_sota import gpucheck


def _check(gpu: bool, totals: dict[int, float], wait: float = 0.01) -> gpucheck.Check:
    rounds = [gpucheck.Round(k, 1 / k, [t / k] * k, [wait] * k, [2**30] * k, [gpu] * k) for k, t in totals.items()]
    return gpucheck.Check(gpu=gpu, machine=[("device", "a GPU" if gpu else "no CUDA GPU")], model="m", rounds=rounds)


def test_advice_names_the_best_share_and_when_mps_would_help(monkeypatch, tmp_path):
    monkeypatch.setattr(gpucheck, "MPS_PIPE", tmp_path / "no-mps")
    timesliced = gpucheck.advice(_check(True, {1: 1000, 2: 1100, 4: 1050}))
    assert "2 trial(s) per GPU (gpus_per_trial: 0.5)" in timesliced[0] and "1.10x" in timesliced[0]
    assert any("MPS" in a and "nvidia-cuda-mps-control -d" in a for a in timesliced)
    scaling = gpucheck.advice(_check(True, {1: 1000, 2: 1900, 4: 3600}))
    assert "gpus_per_trial: 0.25" in scaling[0] and any("MPS would add little" in a for a in scaling)
    waiting = gpucheck.advice(_check(True, {1: 1000, 2: 1900}, wait=0.2))
    assert any("20%" in a and "cpus_per_trial" in a for a in waiting)
    text = gpucheck.report(_check(True, {1: 1000, 2: 1900, 4: 3600}))
    assert "| 4 | 0.25 | 900 | 3,600 | 3.60 | 1.0% | 1.1 GB | yes |" in text


@pytest.mark.slow
def test_gpu_check_without_a_gpu_measures_the_cpu_through_ray(monkeypatch):
    run = cli("gpu-check", "--space", "quick", "--seconds", "1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "no CUDA GPU" in out and "a tiny stand-in" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "4"]
    assert all(float(r.split("|")[4].replace(",", "")) > 0 for r in rows), rows  # images/s in total
    assert "advice: run " in out and "MPS does not apply" in out
