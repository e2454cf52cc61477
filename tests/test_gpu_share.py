"""A trial's Ray GPU share reaches the cache's placement (`cache.place`, whose budget is that share of the
GPU: tests/test_cache.py checks the formula), through the real path: Ray assigns the share, the Tune
trainable reads it (`trainable._assigned_gpus`), `recipe.train` hands it to the cached DataLoaders. Ray
counts GPUs as a resource, so a machine without one can declare one: the trial then trains on the CPU,
and what reaches `cache.place` is recorded on the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT, tiny

# In a child process: its own Ray (one declared GPU), nothing of it outlives the test. The trainable is
# tune_sota's own trial, with cache.place recording its arguments in the worker first.
ONE_TRIAL = r"""
import json, sys
from pathlib import Path
import ray
from ray import tune

config, share, out = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

def recorded_trial(config):
    from tune_sota import cache, trainable
    place = cache.place

    def recording(train, valid, device, gpu_fraction=None):
        with open(out, "a") as f:
            f.write(json.dumps({"gpu_fraction": gpu_fraction, "device": str(device)}) + "\n")
        return place(train, valid, device, gpu_fraction)

    cache.place = recording
    trainable.trial(config)

ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
try:
    fn = tune.with_resources(recorded_trial, {"cpu": 1, "gpu": share})
    results = tune.Tuner(fn, param_space=config, run_config=tune.RunConfig(
        storage_path=str(Path(out).parent / "ray-results"), name="share", verbose=0)).fit()
    print("RESULT", json.dumps({"errors": [str(r.error) for r in results if r.error],
                                "metrics": [r.metrics.get("accuracy") for r in results]}))
finally:
    ray.shutdown()
"""


def test_a_trials_gpu_share_reaches_the_caches_placement(image_folder, tmp_path):
    out = tmp_path / "placed.jsonl"
    ray_tmp = Path(tempfile.mkdtemp(prefix="tgs-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_TMPDIR": str(ray_tmp),
           "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    config = tiny(image_folder, epochs=1, pipeline="cached")
    try:
        run = subprocess.run([sys.executable, "-c", ONE_TRIAL, json.dumps(config), "0.25", str(out)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert result["errors"] == [] and result["metrics"][0] is not None, result
    placed = [json.loads(x) for x in out.read_text().splitlines()]
    assert placed and all(p["gpu_fraction"] == 0.25 for p in placed), placed  # Ray's share, not None (a whole GPU)
