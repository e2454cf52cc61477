"""The Ray Tune side of training: thin function trainables around `recipe.train` for search trials and
confirmation runs (whose last report adds the TTA accuracy).

It lives in the package (not a script) so that Ray workers import it by name, and a trial imports
`recipe`, and with it the fastai modules whose import patches `Learner` (fit_one_cycle, tta, to_bf16),
before it trains. That import is inside the trial, not at the top: the driver only names these
functions, and without torch and fastai it starts about 4 seconds sooner.
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
from ray import tune

from tune_sota.config import Config
from tune_sota.results import EpochReport
from tune_sota.schedule import size_at_epoch

STATE_FILE = "state.pt"  # model and optimizer (recipe.save_state)
ERROR_FILE = "error.txt"  # the traceback of a trial that raised
METRICS_FILE = "metrics.json"  # what the epoch reported, to repeat it for a trial restored when already done


def _assigned_cpus() -> float | None:
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


def _assigned_gpus() -> float | None:
    """The trial's Ray-assigned share of its GPU (0.125 when eight trials share one), or None without one."""
    return ray.get_runtime_context().get_assigned_resources().get("GPU")


def checkpoint_epochs(epochs: int, shares=(), every: int = 0, first_final: int = 1) -> set[int]:
    """The epochs after which a run of `epochs` checkpoints: where ASHA judges it (the first epoch at or
    past each rung share, as `scheduler.ScheduleASHA.decide` does, and not before `first_final`, the first
    epoch at the final size, when its rungs wait for it), its last, and every `every` epochs.

    A checkpoint of xresnet50 with Adam's buffers is about 283 MB, persisted inside the epoch's report
    (over NFS or S3, seconds or more); the rungs and the end are where one is needed, the rest is for
    what a lost node or a stop may cost (bench/checkpoint_cost.py)."""
    at = {max(math.ceil(s * epochs - 1e-9), first_final) for s in shares} | {epochs}
    if every:
        at |= set(range(every, epochs + 1, every))
    return {e for e in at if 1 <= e <= epochs}


def first_final_epoch(cfg: Config) -> int:
    """The first epoch (1-based) a run trains at its final size: after its progressive-resizing stages."""
    return next(e + 1 for e in range(cfg.epochs) if size_at_epoch(cfg.stages, cfg.epochs, e) >= cfg.stages[-1][0])


def trial(config: dict, shares=(), every: int = 0, final_size: bool = False) -> None:
    """One search trial: train `config`, reporting every epoch, with a checkpoint at the epochs of
    `checkpoint_epochs(epochs, shares, every)`; resume from one if given."""
    _run(config, tta=False, shares=shares, every=every, final_size=final_size)


def confirmation(config: dict, every: int = 0) -> None:
    """One confirmation run (`config["run"]`, see `confirm.plan`): like a trial, and its last report adds
    the TTA accuracy."""
    _run(config["run"]["config"], tta=True, every=every)


def _run(config: dict, tta: bool, shares=(), every: int = 0, final_size: bool = False) -> None:
    """Train `config` under Tune, one report per epoch (those of `checkpoint_epochs` with a checkpoint),
    resuming from one.

    An exception inside training (a bad image, CUDA out of memory) is reported as the trial's
    `error` rather than raised, so Ray does not retry a trial that would fail again; Ray's own
    retries (FailureConfig) stay for lost workers and nodes.
    """
    import torch

    from tune_sota import recipe  # torch and fastai, with fastai's patches of Learner: see the module's docstring

    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch
    # Trials reuse their actors (search.tune_config): free the last trial's Learner, whose callbacks
    # make reference cycles, and the GPU memory it held, before this one allocates its own.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cfg = Config(**config)
    # a rung judges a fine-tune only once it has unfrozen (scheduler.ScheduleASHA), so it checkpoints there
    first_judged = max(first_final_epoch(cfg) if final_size else 1, cfg.frozen_epochs + 1)
    checkpoint_at = checkpoint_epochs(cfg.epochs, shares, every, first_judged)
    blob, restored = None, {}
    if (ckpt := tune.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            blob = (Path(d) / STATE_FILE).read_bytes()
            restored = json.loads((Path(d) / METRICS_FILE).read_text())
    last = {"epoch": restored.get("epoch", 0), "accuracy": restored.get("accuracy", 0.0)}
    # Where this attempt runs and which epoch it started from: after a lost node, the history shows
    # the retried trial carrying on from its checkpoint rather than from epoch 1.
    where = {"error": "", "node": ray.get_runtime_context().get_node_id()[:12], "start_epoch": 0,
             "sched": cfg.sched}  # the schedule shape, which ASHA's rungs compare within (scheduler.py)
    held = {}  # the last epoch, reported once a confirmation's TTA score or a multi-label trial's threshold is known
    fit_threshold = cfg.multi_label and not tta  # a confirmation scores at the threshold its trial fitted

    def report(r: EpochReport, learn) -> None:
        metrics = r.row(**where, n_valid=len(learn.dls.valid.dataset))  # for the selection noise (uncertainty)
        if r.diverged:  # no checkpoint of a model that has gone to NaN
            tune.report({**metrics, "accuracy": 0.0})
            return
        last.update(epoch=r.epoch, accuracy=r.accuracy)
        if (tta or fit_threshold) and r.epoch == r.epochs:
            held.update(metrics)
            return
        if r.epoch in checkpoint_at:
            _report_with_checkpoint(metrics, learn, r.epoch)
        else:
            tune.report(metrics)

    if blob is not None:
        where["start_epoch"] = recipe.checkpoint_epoch(blob)
        if where["start_epoch"] >= cfg.epochs:  # finished before the driver died: say so again
            tune.report({**restored, **where})
            return
    try:
        learn = recipe.train(cfg, cpus=_assigned_cpus(), on_epoch=report, checkpoint=blob, gpus=_assigned_gpus())
        if held and tta:
            _report_with_checkpoint({**held, **recipe.score(learn)}, learn, cfg.epochs)
        elif held:  # judged at the space's threshold (`accuracy`); the one fitted on its holdout goes with it
            threshold, at_it = recipe.fit_threshold(learn)
            _report_with_checkpoint({**held, "threshold": threshold, "fitted_accuracy": at_it}, learn, cfg.epochs)
    except Exception as e:  # recorded, not retried: see the docstring
        message = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        # The summary shows the message; the traceback goes beside the trial's results, not into the
        # search's output (a bad image is the user's to fix, a bug is a developer's to read there).
        (Path(tune.get_context().get_trial_dir()) / ERROR_FILE).write_text(traceback.format_exc())
        failed = EpochReport(epoch=last["epoch"], epochs=cfg.epochs, size=0, train_loss=math.nan,
                             valid_loss=math.nan, accuracy=last["accuracy"], epoch_s=0.0)
        tune.report(failed.row(**{**where, "error": message}))


def _report_with_checkpoint(metrics: dict, learn, epochs_done: int) -> None:
    from tune_sota import recipe

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / STATE_FILE).write_bytes(recipe.save_state(learn, epochs_done))
        (Path(d) / METRICS_FILE).write_text(json.dumps(metrics))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
