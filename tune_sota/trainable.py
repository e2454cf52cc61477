"""The Ray Tune side of a trial: a thin function trainable around `recipe.train`, and the scoring
of a finished trial's checkpoint with TTA (here, or as a Ray task on a cluster's node).

It lives in the package (not a script) so that Ray workers import it, and with it the fastai
modules whose import patches `Learner` (fit_one_cycle, tta, to_bf16).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import tempfile
import traceback
import warnings
from pathlib import Path

import ray
import torch
from ray import tune

from tune_sota import recipe
from tune_sota.config import Config

STATE_FILE = "state.pt"  # model and optimizer (recipe.save_state)
METRICS_FILE = "metrics.json"  # what the epoch reported, to repeat it for a trial restored when already done


def _assigned_cpus() -> float | None:
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


def trial(config: dict) -> None:
    """One trial: train `config`, reporting every epoch with a checkpoint; resume from one if given.

    An exception inside training (a bad image, CUDA out of memory) is reported as the trial's
    `error` rather than raised, so Ray does not retry a trial that would fail again; Ray's own
    retries (FailureConfig) stay for lost workers and nodes.
    """
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch
    # Trials reuse their actors (search.tune_config): free the last trial's Learner, whose callbacks
    # make reference cycles, and the GPU memory it held, before this one allocates its own.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cfg = Config(**config)
    blob, restored = None, {}
    if (ckpt := tune.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            blob = (Path(d) / STATE_FILE).read_bytes()
            restored = json.loads((Path(d) / METRICS_FILE).read_text())
    last = {"epoch": restored.get("epoch", 0), "accuracy": restored.get("accuracy", 0.0)}
    # Where this attempt runs and which epoch it started from: after a lost node, the history shows
    # the retried trial carrying on from its checkpoint rather than from epoch 1.
    where = {"node": ray.get_runtime_context().get_node_id()[:12], "start_epoch": 0}

    def report(r: recipe.EpochReport, learn) -> None:
        metrics = {"epoch": r.epoch, "epochs": r.epochs, "size": r.size, "accuracy": r.accuracy,
                   "valid_loss": r.valid_loss, "train_loss": r.train_loss, "epoch_s": r.seconds,
                   "diverged": r.diverged, "error": "", **where}
        if r.diverged:  # no checkpoint of a model that has gone to NaN
            metrics["accuracy"] = 0.0
            tune.report(metrics)
            return
        last.update(epoch=r.epoch, accuracy=r.accuracy)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / STATE_FILE).write_bytes(recipe.save_state(learn, r.epoch))
            (Path(d) / METRICS_FILE).write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    if blob is not None:
        where["start_epoch"] = recipe.checkpoint_epoch(blob)
        if where["start_epoch"] >= cfg.epochs:  # finished before the driver died: say so again
            tune.report({**restored, **where})
            return
    try:
        recipe.train(cfg, cpus=_assigned_cpus(), on_epoch=report, checkpoint=blob)
    except Exception as e:  # recorded, not retried: see the docstring
        message = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        print(f"trial failed: {message}\n{traceback.format_exc()}")
        tune.report({"epoch": last["epoch"], "epochs": cfg.epochs, "size": 0, "accuracy": last["accuracy"],
                     "valid_loss": math.nan, "train_loss": math.nan, "epoch_s": 0.0, "diverged": False,
                     "error": message, **where})


def score(config: dict, checkpoint: tune.Checkpoint, cpus: float | None = None) -> dict[str, float]:
    """Plain and TTA accuracy of a trial's checkpoint, in this process."""
    with checkpoint.as_directory() as d:
        blob = (Path(d) / STATE_FILE).read_bytes()
    return recipe.evaluate(Config(**config), blob, cpus=cpus)


def _score_task(config: dict, checkpoint: tune.Checkpoint) -> dict[str, float]:
    warnings.filterwarnings("ignore")
    return score(config, checkpoint, _assigned_cpus())


def score_remote(config: dict, checkpoint: tune.Checkpoint, *, cpus: float, gpus: float) -> ray.ObjectRef:
    """Score a trial's checkpoint plainly and with TTA, on a worker with the trial's resources."""
    return ray.remote(num_cpus=cpus, num_gpus=gpus)(_score_task).remote(config, checkpoint)
