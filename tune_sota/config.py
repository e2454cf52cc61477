"""The one config schema: a training run (`Config`), the search settings (`SearchSettings`), and
search spaces, which are that same schema where any value may be a distribution.

A space file is YAML: the `Config` fields at the top level, an optional `search:` section, and an
optional `result:` block (written by the exporter, ignored when read). An exported best trial is a
space with nothing left to sample, so it is accepted anywhere a space is.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tune_sota import sources
from tune_sota.base import UserError, write_atomic  # noqa: F401  (re-exported: most modules import them from here)
from tune_sota.schedule import parse_schedule


def _spaces_dir() -> Path:
    """The shipped spaces: inside the installed package (a wheel puts search_spaces/ there, see
    pyproject.toml), else the repository's top-level search_spaces/ (an editable install)."""
    inside = Path(__file__).resolve().parent / "search_spaces"
    return inside if inside.is_dir() else Path(__file__).resolve().parent.parent / "search_spaces"


SPACES_DIR = _spaces_dir()


class ConfigError(UserError):
    """A config or space that does not fit the schema."""


def _one_of(*allowed):
    def check(v):
        return None if v in allowed else "one of " + ", ".join(map(str, allowed))

    return check


def _at_least(lo, *, strict=False):
    def check(v):
        ok = v > lo if strict else v >= lo
        return None if ok else f"{'>' if strict else '>='} {lo}"

    return check


def _between(lo, hi, *, hi_open=False):
    def check(v):
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"in [{lo}, {hi}{')' if hi_open else ']'}"

    return check


def _schedule(v):
    if v == "":
        return None  # no progressive resizing
    try:
        parse_schedule(v)
    except ValueError as e:
        return str(e)
    return None


def _data(v):
    if not v.strip():
        return "'digits', an Imagenette name, a folder of images, or {csv: labels.csv, folder: images}"
    try:
        sources.parse_data(v)
    except UserError as e:
        return str(e).removeprefix("data: ")
    return None


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str) -> float:
    """Seconds of `8h`, `90m`, `40s`, `1h30m` or `2.5h`; ValueError otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    parts = _DURATION.findall(t)
    if not t or "".join(a + u for a, u in parts) != t:
        raise ValueError(f"{text!r} is not a duration; use e.g. 8h, 90m, 40s or 1h30m")
    seconds = sum(float(a) * _UNITS[u] for a, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is no time at all; use e.g. 8h, 90m, 40s")
    return seconds


def _duration(v):
    if v == "":
        return None  # no budget: the search runs num_samples trials
    try:
        parse_duration(v)
    except ValueError:
        return "a duration such as 8h, 90m, 40s or 1h30m ('' = none)"
    return None


def _keep(v):
    ok = v == "all" if isinstance(v, str) else 1 <= v <= 1000
    return None if ok else "a number of checkpoints per trial (1..1000) or 'all'"


def _arch(v):
    if v in ARCHS:
        return None
    import timm  # only for a name that is not fastai's: importing timm (and torch) takes seconds

    if timm.is_model(v):
        return None
    return (f"one of {', '.join(ARCHS)} (fastai's), or a timm model name (timm.list_models(), e.g. resnet50, "
            f"convnext_tiny, efficientnet_b0)")


def _pretrained(v):
    if isinstance(v, str) and not v.strip():
        return "false, true, or the path of a weights file, a tune_sota model folder, a best.yaml or an export.pkl"
    return None


def _opt(default, help, check=None):
    return field(default=default, metadata={"help": help, "check": check})


ARCHS = ("xresnet18", "xresnet34", "xresnet50",
         # fastai's ResNeXt blocks (32 groups of 4 channels), with squeeze-and-excitation (xse_) or without
         "xse_resnext18", "xse_resnext34", "xse_resnext50", "xresnext18", "xresnext34", "xresnext50")
OPTIMIZERS = ("adam", "ranger", "sgd", "rmsprop", "lamb")  # recipe.OPTIMIZERS maps them to fastai.optimizer's
SCHEDULES = ("one_cycle", "flat_cos")  # recipe.fit applies them
# Sizes at which pool: max keeps the shortcut and the conv path of a downsampling block the same size
# (fastai's MaxPool has no ceil_mode, so an odd feature map halves to different sizes; see recipe).
MAX_POOL_MULTIPLE = 32


def presize_of(size: int, presize: int = 0) -> int:
    """The size items are resized to before batch augmentation: `presize`, or 1.25 x `size` (chapter 7's)."""
    return presize or int(round(size * 1.25))


@dataclass(frozen=True)
class Config:
    """One training run, every value fixed. Field defaults are chapter 7's choices where it has one."""

    data: str = _opt("digits", "'digits' (offline, ships with scikit-learn), imagenette2-160|-320, "
                     "imagenette2, imagewoof2-160|-320, imagewoof2, planet_tiny|planet_sample (multi-label), "
                     "a folder with train/ and val/, a folder of "
                     "class folders (val/ = a stratified 20%), or a table {csv: labels.csv, folder: images} "
                     "(see README, Data)", _data)
    arch: str = _opt("xresnet50", "model: chapter 7's xresnet, or fastai's ResNeXt with squeeze-and-excitation "
                     "(xse_) or without (width narrows the ResNeXt groups too: recipe), or any timm model name as "
                     "fastai's vision_learner takes it (resnet50, convnext_tiny, efficientnet_b0; fastai's head "
                     "on timm's body; width, act, sa and pool are xresnet's only)", _arch)
    pretrained: bool | str = _opt(False, "start from trained weights (README, Fine-tuning): false = from scratch; "
                                  "true = the timm model's published weights (Hugging Face cache; downloaded once "
                                  "by the search's driver, never by a trial); PATH = a weights file (safetensors "
                                  "or a torch state dict) or a tune_sota model (a train --out or trial folder, a "
                                  "best.yaml, an export.pkl), its head replaced when the classes differ. The "
                                  "model's own normalization statistics are used", _pretrained)
    freeze_epochs: int = _opt(-1, "epochs that train the new head only (fastai's fine_tune), counted in `epochs`; "
                              "0 = everything trains from the start; -1 = fastai's 1 with pretrained weights (when "
                              "epochs > 1), 0 from scratch", _between(-1, 1000))
    lr_mult: float = _opt(100.0, "discriminative rates after the unfreeze (fastai's fine_tune): the body's first "
                          "layers train at lr/lr_mult, the head at lr (both halved, as fine_tune does); "
                          "pretrained only", _between(1, 1e6))
    width: float = _opt(1.0, "channel-width multiplier; below 1 keeps CPU runs small", _between(0.0625, 4))
    act: str = _opt("relu", "activation in xresnet's layers: relu (chapter 7's) or mish (the Imagenette "
                    "leaderboard's)", _one_of("relu", "mish"))
    sa: bool = _opt(False, "xresnet's simple self-attention (fastai's `sa`): one layer after the last block of the "
                           "first stage")
    pool: str = _opt("avg", "pooling on the shortcut of xresnet's downsampling blocks (fastai's `pool`, before the "
                     "1x1 conv: ResNet-D's avg, or max as in the leaderboard's 5-epoch record); the stem's max pool "
                     "and the head's average pool stay; max needs every training size a multiple of 32",
                     _one_of("avg", "max"))
    size: int = _opt(128, "final image size in pixels (validation always runs at it)", _between(8, 1024))
    resize: str = _opt("", "progressive-resizing schedule, e.g. '64>96>128' or '64:2>128:1' "
                       "(size:share of epochs); must end at `size`; '' = `size` throughout", _schedule)
    presize: int = _opt(0, "item resize before batch augmentation; 0 = 1.25 x size", _between(0, 2048))
    min_scale: float = _opt(0.35, "smallest crop area of random-resized-crop", _between(0.05, 1))
    flip: bool = _opt(True, "random horizontal flips (off for data where mirroring changes the class)")
    # Lesson 3's augmentations: fastai's aug_transforms arguments and defaults. They apply where fastai's
    # transforms run: the fastai pipeline, and the cached one with augment: chapter7 (on the trial's
    # device); crop_flip does crops and flips only (flip_vert included).
    flip_vert: bool = _opt(False, "with flip, also flip vertically and transpose (fastai's Dihedral: the 8 "
                           "symmetries of a square; satellite and microscope images)")
    max_rotate: float = _opt(10.0, "largest random rotation in degrees (fastai's)", _between(0, 180))
    max_zoom: float = _opt(1.1, "largest random zoom in (fastai's; 1 = none)", _between(1, 10))
    max_lighting: float = _opt(0.2, "largest random change of brightness and contrast (fastai's; 0 = none)",
                               _between(0, 0.99))
    max_warp: float = _opt(0.2, "largest random perspective warp (fastai's; 0 = none, e.g. satellite images)",
                           _between(0, 0.99))
    p_affine: float = _opt(0.75, "probability of the affine transforms per image: rotation, zoom, warp (fastai's)",
                           _between(0, 1))
    p_lighting: float = _opt(0.75, "probability of the lighting change per image (fastai's)", _between(0, 1))
    batch_size: int = _opt(64, "images per batch", _between(1, 4096))
    epochs: int = _opt(5, "epochs of the one-cycle schedule; with pretrained weights, of both fine-tuning phases "
                       "together (fastai's fine_tune(4) = epochs: 5, freeze_epochs: 1)", _between(1, 1000))
    lr: float = _opt(3e-3, "peak one-cycle learning rate (fine-tuning: fastai's base_lr)", _between(1e-6, 10))
    wd: float = _opt(0.01, "weight decay", _between(0, 1))
    opt: str = _opt("adam", "optimizer, fastai's own: adam (AdamW, chapter 7's), ranger (RAdam + Lookahead), "
                    "sgd (with momentum), rmsprop, lamb", _one_of(*OPTIMIZERS))
    mom: float = _opt(0.0, "momentum (beta1 of adam/ranger/lamb, momentum of sgd/rmsprop), held constant through "
                      "the schedule; 0 = fastai's default: one_cycle cycles it 0.95>0.85>0.95, flat_cos keeps "
                      "the optimizer's own (adam, lamb, sgd 0.9; ranger 0.95; rmsprop none)", _between(0, 0.999))
    sqr_mom: float = _opt(0.0, "moving average of squared gradients (beta2) of adam/ranger/lamb/rmsprop; "
                          "0 = fastai's default, 0.99", _between(0, 0.99999))
    eps: float = _opt(0.0, "epsilon added to the denominator of adam/ranger/lamb/rmsprop; 0 = fastai's default "
                      "(1e-5; ranger 1e-6, rmsprop 1e-8)", _between(0, 1))
    sched: str = _opt("one_cycle", "learning-rate schedule: one_cycle (chapter 7's fit_one_cycle: warm up, cosine "
                      "anneal) or flat_cos (fastai's fit_flat_cos: flat at lr, then cosine anneal; the "
                      "leaderboard's)", _one_of(*SCHEDULES))
    pct_start: float = _opt(0.0, "share of the schedule before the anneal: one_cycle's warm-up, flat_cos's flat "
                            "part; 0 = fastai's default (one_cycle 0.25, flat_cos 0.75)", _between(0, 0.95))
    mixup: float = _opt(0.0, "MixUp alpha; 0 = off", _between(0, 10))
    label_smoothing: float = _opt(0.0, "label-smoothing epsilon; 0 = plain cross-entropy", _between(0, 1, hi_open=True))
    multi_metric: str = _opt("f2", "multi-label data (a table with label_delim): the score trials are judged by, "
                             "reported in the accuracy columns: f2 (F-beta 2 averaged per image, Planet's) or "
                             "accuracy_multi (the share of right label decisions)", _one_of("f2", "accuracy_multi"))
    threshold: float = _opt(0.5, "multi-label: the probability above which a label is predicted; trials are judged "
                            "at it, then each trial's is fitted on its holdout after training (never searched); "
                            "best.yaml and the export keep the winner's", _between(0.01, 0.99))
    normalize: str = _opt("imagenet", "normalization statistics: ImageNet's, or measured on a batch",
                          _one_of("imagenet", "dataset"))
    seed: int = _opt(42, "random seed of the run", _at_least(0))
    precision: str = _opt("auto", "auto = bf16 on GPUs that compute it natively (Ampere and later), fp16 on "
                          "older GPUs, fp32 on CPU", _one_of("auto", "fp32", "bf16", "fp16"))
    workers: int = _opt(-1, "DataLoader worker processes; -1 = from the CPUs the trial was given", _at_least(-1))
    pipeline: str = _opt("cached", "data pipeline: 'cached' decodes every image once into a uint8 cache that a "
                         "node's trials share, then crops and flips whole batches (on the GPU if there is one); "
                         "'fastai' is fastai's DataBlock (decode and presize per item in workers, chapter 7's "
                         "aug_transforms per batch)", _one_of("cached", "fastai"))
    augment: str = _opt("crop_flip", "batch augmentation on the cached pipeline: 'crop_flip' (random-resized crop "
                        "and flip) or 'chapter7' (fastai's aug_transforms: warps, rotations, lighting, then the "
                        "crop); the fastai pipeline always uses chapter 7's", _one_of("crop_flip", "chapter7"))
    holdout: float = _opt(0.0, "share of train/ held out (stratified, the same in every run) and validated on "
                          "instead of val/; a search sets it from search.holdout; 0 = validate on val/",
                          _between(0, 0.5))

    def __post_init__(self):
        for f in fields(self):
            check_value(f, getattr(self, f.name), "")
        stages = parse_schedule(self.resize) if self.resize else []
        if stages and stages[-1][0] != self.size:
            raise ConfigError(
                f"resize '{self.resize}' ends at {stages[-1][0]} px but size is {self.size}: "
                f"the last stage must be the final size"
            )
        if self.arch.startswith("xse_") and self.width < 0.25:  # SE needs 16 channels: fastai's gives 0 below
            raise ConfigError(f"arch {self.arch} needs width >= 0.25 (its squeeze-and-excitation has no channel "
                              f"left at {self.width:g}); use a wider width or an arch without xse_")
        if self.pretrained is True and self.arch in ARCHS:
            raise ConfigError(f"pretrained: true needs a timm model (fastai publishes no weights for {self.arch}); "
                              f"use e.g. arch: resnet50, or pretrained: PATH (a weights file or a tune_sota model)")
        if self.pretrained is not False and self.normalize == "dataset":
            raise ConfigError("normalize: dataset with pretrained weights: a pretrained model expects the "
                              "statistics it was trained with, and uses them; drop normalize (or set imagenet)")
        if self.freeze_epochs > 0 and self.pretrained is False:
            raise ConfigError(f"freeze_epochs {self.freeze_epochs} needs pretrained weights (a model from scratch "
                              f"has no trained body to keep frozen); set pretrained, or freeze_epochs: 0")
        if self.freeze_epochs >= self.epochs:
            raise ConfigError(f"freeze_epochs {self.freeze_epochs} leaves nothing to fine-tune in epochs "
                              f"{self.epochs} (epochs counts both phases); use epochs > freeze_epochs")
        if self.pool == "max" and any(size % MAX_POOL_MULTIPLE for size, _ in self.stages):
            raise ConfigError(
                f"pool: max needs every training size a multiple of {MAX_POOL_MULTIPLE} (size {self.size}, resize "
                f"'{self.resize}'); use pool: avg or sizes like 32, 64, 128, 160"
            )

    @property
    def stages(self) -> list[tuple[int, float]]:
        """The resize schedule as (size, share) pairs, the last at the final size."""
        return parse_schedule(self.resize) if self.resize else [(self.size, 1.0)]

    @property
    def frozen_epochs(self) -> int:
        """Epochs that train the head only: `freeze_epochs`, or fastai's default for -1."""
        if self.freeze_epochs >= 0:
            return self.freeze_epochs
        return 1 if self.pretrained is not False and self.epochs > 1 else 0

    @property
    def multi_label(self) -> bool:
        """Whether the data is a table with several labels per image (`label_delim`; planet_tiny, planet_sample)."""
        return bool(sources.label_delim(self.data))

    @property
    def item_size(self) -> int:
        """The size items are resized to before batch augmentation (presizing)."""
        return presize_of(self.size, self.presize)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCHEDULERS = ("asha", "fifo", "ray-asha")  # tune_sota.scheduler.make_scheduler builds them
SEARCHERS = ("tpe", "gp", "random", "ray-optuna")  # search.make_searcher builds them
PRIOR_MODES = ("off", "first", "pibo")  # priors.prior_sampler builds them
EPOCH_MODES = ("max", "searched")  # hold_epochs applies them


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs: the `search:` section of a space file."""

    num_samples: int = _opt(8, "trials to run", _between(1, 100000))
    max_concurrent: int = _opt(0, "trials running at once; 0 = as many as the resources allow", _at_least(0))
    scheduler: str = _opt("asha", "early stopping: 'asha' compares trials at the same share of their own "
                          "schedule, and only with trials of the same sched; 'fifo' stops nothing; 'ray-asha' is "
                          "Ray's stock ASHA on epoch counts (not fair to searched epochs; for comparison)",
                          _one_of(*SCHEDULERS))
    grace: float = _opt(0.75, "ASHA: share of its schedule a trial runs before it can be stopped; rungs sit at "
                        "1/rf, 1/rf^2... of each schedule down to this share, or at this share alone when it is "
                        "above 1/rf", _between(0.01, 0.99))
    reduction_factor: int = _opt(2, "ASHA: keep the top 1/N at each rung", _between(2, 100))
    final_size_rungs: bool = _opt(True, "ASHA: a progressive-resizing trial still training below its final size at "
                                  "a rung waits for its first epoch at the final size to be judged there")
    searcher: str = _opt("tpe", "Optuna sampler: 'tpe' (random for startup_trials, then TPE), 'gp' (random for "
                         "startup_trials, then Optuna's Gaussian-process sampler) or 'random'; "
                         "'ray-optuna' is Ray's stock OptunaSearch with TPE, which reports stopped trials as "
                         "complete (no study on disk; for comparison)", _one_of(*SEARCHERS))
    seed: int = _opt(0, "seed of Optuna's sampler", _at_least(0))
    startup_trials: int = _opt(4, "trials Optuna samples at random before TPE models the results", _at_least(1))
    epochs: str = _opt("max", "what a searched `epochs` range means: 'max' trains every trial for the top of the "
                       "range, so the trials go to the other keys and ASHA compares schedules of one length (the "
                       "best config trained longest on each of three recorded tasks: README, 'What the defaults "
                       "rest on'); 'searched' samples it like any other key (cheaper trials; fix `epochs` to what "
                       "you can afford instead)", _one_of(*EPOCH_MODES))
    priors: str = _opt("off", "what the search makes of the space's priors (prior: and confidence: beside a "
                       "distribution): 'off' ignores them; 'first' makes the experts' pick the first trial; 'pibo' "
                       "also draws a quarter of the start-up trials from the priors, then a share startup/(4n), and "
                       "weights TPE's proposals by prior^(1/n) (priors.py)",
                       _one_of(*PRIOR_MODES))
    storage: str = _opt("", "Optuna storage of the study: '' = results/NAME/study.db (SQLite), or a database URL "
                        "(postgresql://..., mysql://...) to share it")
    select_on: str = _opt("holdout", "what trials are judged on: 'holdout' (a share of train/; val/ is kept for "
                          "the confirmation) or 'val' (optimistic: the confirmation then reuses the data that chose)",
                          _one_of("holdout", "val"))
    holdout: float = _opt(0.1, "share of train/ held out for selection when select_on is 'holdout'",
                          _between(0.01, 0.5))
    confirm_top: int = _opt(2, "best completed trials (at most) retrained on all of train/ and scored on val/, "
                            "plainly and with TTA; 0 = none",
                            _between(0, 100))
    confirm_seeds: int = _opt(2, "seeds per confirmed config (and per baseline); the result is their mean +- std",
                              _between(1, 100))
    cpus_per_trial: float = _opt(1.0, "CPUs each trial reserves", _between(0.01, 1024))
    gpus_per_trial: float = _opt(0.0, "GPUs each trial reserves; fractions share a GPU", _between(0, 64))
    keep_checkpoints: int | str = _opt(2, "checkpoints kept per trial (the newest); after the search only the "
                                       "trials worth loading keep theirs (the confirmed ones, else the best); "
                                       "'all' keeps every checkpoint of every trial", _keep)
    time_budget: str = _opt("", "wall-clock budget of the trials, e.g. 8h, 90m, 40s: once spent no trial starts and "
                            "running ones stop at the end of their epoch; the confirmation still runs; '' = none",
                            _duration)
    baseline_first: bool = _opt(False, "enqueue the baseline recipe (the space's baseline: values, clipped to its "
                                "ranges) as the first trial, so that TPE knows where the plain recipe stands")
    checkpoint_every: int = _opt(5, "a trial also checkpoints every N epochs (besides its rungs and its last epoch, "
                                 "where it always does), for what a lost node or a stop costs; 0 = only there",
                                 _between(0, 100000))


DEFAULT_CONFIDENCE = 0.5  # a prior given without a confidence: medium (NePS's scale: low, medium, high)

# Keys of older space files: renamed ones are read under their new name, retired ones explain themselves.
RENAMED_SEARCH_KEYS = {"score_top": "confirm_top"}
RETIRED_SEARCH_KEYS = {
    "grace_period": "search.grace_period (epochs) is now search.grace, a share of each trial's schedule, e.g. 0.5",
}
# The baseline every search is confirmed against: chapter 7's plain recipe (Config's own defaults for
# the searched techniques, spelled out so that a space's fixed values do not leak into it).
BASELINE = {"lr": 3e-3, "mixup": 0.0, "label_smoothing": 0.0, "resize": "",
            # and none of the knobs beyond the chapter: Adam at fastai's settings, one-cycle, ReLU, no
            # self-attention, average-pool shortcuts (0 = fastai's default for mom, sqr_mom, eps, pct_start)
            "opt": "adam", "mom": 0.0, "sqr_mom": 0.0, "eps": 0.0, "sched": "one_cycle", "pct_start": 0.0,
            "act": "relu", "sa": False, "pool": "avg",
            # fine-tuning: fastai's fine_tune defaults (a space's baseline: sets its lr, e.g. fine_tune's 2e-3)
            "freeze_epochs": -1, "lr_mult": 100.0}


@dataclass(frozen=True)
class Dist:
    """A value to sample: `{kind: args}` in YAML, optionally with an expert's pick beside it
    (`{loguniform: [1.0e-3, 6.0e-2], prior: 3.0e-3, confidence: 0.5}`), which `search.priors` uses."""

    kind: str
    args: tuple
    prior: Any = None  # the expert's pick: a value in the range or one of the choices; None = no prior
    confidence: float = DEFAULT_CONFIDENCE  # how sure, in (0, 1): priors.py turns it into a spread

    def to_yaml(self):
        out = {self.kind: list(self.args)}
        if self.prior is not None:
            out.update(prior=self.prior, confidence=self.confidence)
        return out


DIST_KINDS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None}
PRIOR_KEYS = ("prior", "confidence")  # what a distribution may carry beside its one kind


@dataclass
class Space:
    """A parsed space file: the config values (fixed or `Dist`) and the search settings."""

    values: dict[str, Any]
    search: SearchSettings
    name: str = "space"
    source: str = "<dict>"
    baseline: dict[str, Any] = field(default_factory=lambda: dict(BASELINE))

    @property
    def searched(self) -> dict[str, Dist]:
        return {k: v for k, v in self.values.items() if isinstance(v, Dist)}

    def fixed_values(self) -> dict[str, Any]:
        """The values the space fixes (everything not a distribution)."""
        return {k: v for k, v in self.values.items() if not isinstance(v, Dist)}

    def options(self, key: str) -> list:
        """The values `key` can take: its choices, or its one value (the schema default if unset)."""
        v = self.values.get(key, getattr(Config, key))
        return list(v.args) if isinstance(v, Dist) else [v]

    def fixed(self) -> Config:
        """The space as one `Config`; an error if anything is still a distribution."""
        if self.searched:
            names = ", ".join(self.searched)
            raise ConfigError(f"{self.source}: {names} still a distribution; a config to train needs fixed values")
        return Config(**self.values)

    def resolve(self, sampled: dict[str, Any]) -> Config:
        """A `Config` from this space with `sampled` filling in the distributions."""
        return Config(**{**self.values, **sampled})

    def baseline_config(self, **over) -> Config:
        """The baseline run: the space's fixed values, the schema defaults for what is searched, the
        `baseline:` section on top (chapter 7's plain recipe by default), then `over`."""
        return Config(**{**self.fixed_values(), **self.baseline, **over})


def hold_epochs(space: Space) -> tuple[Space, int | None]:
    """(the space a search runs, the epochs it holds): with `search.epochs: max` a searched `epochs` becomes the top
    of its range. Accuracy grows with the schedule's length far more than with any other key at a search's budget
    (about half the variance on the recorded table), so the range's top is what the best config uses and sampling
    shorter schedules spends trials learning that (issue 26, bench/RESULTS.md)."""
    e = space.values.get("epochs")
    if space.search.epochs != "max" or not isinstance(e, Dist):
        return space, None
    top = int(max(e.args))
    return dataclasses.replace(space, values={**space.values, "epochs": top}), top


def _type_name(t) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "int | str": "an integer or a string", "bool | str": "true, false or a string"}[t]


def problem(f: dataclasses.Field, v) -> str | None:
    """What is wrong with `v` as a value of field `f` ("0 is not allowed; must be ..."), or None."""
    t = f.type if isinstance(f.type, str) else f.type.__name__
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "str": isinstance(v, str),
        "bool": isinstance(v, bool),
        "int | str": isinstance(v, (int, str)) and not isinstance(v, bool),
        "bool | str": isinstance(v, (bool, str)),
    }[t]
    if not ok:
        return f"{v!r} is not {_type_name(t)}"
    check = f.metadata.get("check")
    wrong = check(v) if check else None
    return f"{v!r} is not allowed; must be {wrong}" if wrong else None


def check_value(f: dataclasses.Field, v, where: str):
    """Raise ConfigError if `v` is not a valid value of field `f` (`where` prefixes the message)."""
    why = problem(f, v)
    if why:
        raise ConfigError(f"{where}{f.name}: {why}")


def _parse_dist(f: dataclasses.Field, raw: dict, where: str) -> Dist:
    extra = {k: raw[k] for k in PRIOR_KEYS if k in raw}
    d = _parse_kind(f, {k: v for k, v in raw.items() if k not in PRIOR_KEYS}, where)
    return _with_prior(f, d, extra, where) if extra else d


def _with_prior(f: dataclasses.Field, d: Dist, extra: dict, where: str) -> Dist:
    """`d` carrying the expert's pick `extra['prior']` (checked against the range or the choices) and its
    confidence."""
    name = f"{where}{f.name}"
    if "prior" not in extra or extra["prior"] is None:
        raise ConfigError(f"{name}: confidence needs a prior beside it, e.g. {{{d.kind}: {list(d.args)}, "
                          f"prior: {d.args[0]!r}, confidence: 0.5}}")
    c = extra.get("confidence", DEFAULT_CONFIDENCE)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1:
        raise ConfigError(f"{name}: confidence {c!r} is not allowed; must be a number in (0, 1): 0.25 low, "
                          f"0.5 medium, 0.75 high")
    p = extra["prior"]
    if d.kind == "choice":
        match = [a for a in d.args if a == p and isinstance(a, bool) == isinstance(p, bool) or str(a) == str(p)]
        if not match:
            raise ConfigError(f"{name}: prior {p!r} is not one of the choices: {', '.join(map(str, d.args))}")
        return dataclasses.replace(d, prior=match[0], confidence=float(c))
    if d.kind == "randint" and (isinstance(p, bool) or not isinstance(p, int)):
        raise ConfigError(f"{name}: prior {p!r} is not an integer in [{d.args[0]}, {d.args[1]}]")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not d.args[0] <= p <= d.args[1]:
        raise ConfigError(f"{name}: prior {p!r} is not allowed; must be a number in [{d.args[0]}, {d.args[1]}]")
    return dataclasses.replace(d, prior=p if d.kind == "randint" else float(p), confidence=float(c))


def _parse_kind(f: dataclasses.Field, raw: dict, where: str) -> Dist:
    if len(raw) != 1:
        raise ConfigError(f"{where}{f.name}: a distribution is one key, one of {', '.join(DIST_KINDS)} (and "
                          f"optionally prior: and confidence:)")
    (kind, args), = raw.items()
    if kind not in DIST_KINDS:
        raise ConfigError(f"{where}{f.name}: unknown distribution '{kind}'; use one of {', '.join(DIST_KINDS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}{f.name}: {kind} needs a non-empty list, e.g. {{{kind}: [a, b]}}")
    n = DIST_KINDS[kind]
    if n and len(args) != n:
        raise ConfigError(f"{where}{f.name}: {kind} takes [low, high], got {args!r}")
    t = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "choice":
        for v in args:
            if isinstance(v, (dict, list)):
                raise ConfigError(f"{where}{f.name}: choice options must be plain values, got {v!r}")
            check_value(f, v, where)
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}{f.name}: choice lists an option twice: {args!r}")
        return Dist(kind, tuple(args))
    if t not in ("int", "float") or (kind == "randint" and t != "int") or (kind != "randint" and t == "int"):
        hint = "randint or choice" if t == "int" else "uniform, loguniform or choice" if t == "float" else "choice"
        raise ConfigError(f"{where}{f.name}: {kind} does not fit {_type_name(t)}; use {hint}")
    lo, hi = args
    for v in args:
        check_value(f, v, where)
    if not lo < hi:
        raise ConfigError(f"{where}{f.name}: {kind} range [{lo}, {hi}] is empty; low must be below high")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}{f.name}: loguniform needs low > 0, got {lo}")
    return Dist(kind, (lo, hi))


def _parse_section(cls, raw, where: str, dists: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}expected a mapping of keys to values, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, v in raw.items():
        if key not in known:
            raise ConfigError(f"{where}unknown key '{key}'; allowed: {', '.join(known)}")
        f = known[key]
        if isinstance(v, dict) and dists:
            out[key] = _parse_dist(f, v, where)
        else:
            if isinstance(v, int) and not isinstance(v, bool) and f.type in ("float", float):
                v = float(v)
            check_value(f, v, where)
            out[key] = v
    return out


def parse_space(raw: Any, *, name: str = "space", source: str = "<dict>") -> Space:
    """Validate a space (a dict as read from YAML) and return it; ConfigError names what is wrong."""
    where = f"{source}: "
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}a space is a mapping of config keys, got {type(raw).__name__}")
    raw = dict(raw)
    raw.pop("result", None)  # written by the exporter, informational only
    search_raw = raw.pop("search", None) or {}
    search_raw = dict(search_raw) if isinstance(search_raw, dict) else search_raw
    baseline_raw = raw.pop("baseline", None)
    if not raw and not search_raw and baseline_raw is None:
        raise ConfigError(f"{where}the space sets nothing; give at least `data:` (see search_spaces/quick.yaml)")
    raw = _data_mapping(raw, where)
    values = _parse_section(Config, raw, where, dists=True)
    for old, new in RENAMED_SEARCH_KEYS.items():
        if isinstance(search_raw, dict) and old in search_raw and new not in search_raw:
            search_raw[new] = search_raw.pop(old)
    for old, why in RETIRED_SEARCH_KEYS.items():
        if isinstance(search_raw, dict) and old in search_raw:
            raise ConfigError(f"{where}{why}")
    search = SearchSettings(**_parse_section(SearchSettings, search_raw, where + "search.", dists=False))
    baseline = {**BASELINE, **_parse_section(Config, baseline_raw or {}, where + "baseline.", dists=False)}
    space = Space(values=values, search=search, name=name, source=source, baseline=baseline)
    if isinstance(values.get("threshold"), Dist):
        raise ConfigError(f"{where}threshold is fitted on each trial's holdout after training, never searched; "
                          f"give one value (trials are judged at it), or leave it at 0.5")
    _check_cross_fields(space, where)
    return space


def _data_mapping(raw: dict, where: str) -> dict:
    """`raw` with a `data:` mapping (`{csv: ..., folder: ...}`, not a distribution) in the one-line form
    that `Config.data` holds (`sources.data_value`)."""
    d = raw.get("data")
    if not isinstance(d, dict) or set(d) & set(DIST_KINDS):
        return raw
    try:
        return {**raw, "data": sources.data_value(d)}
    except UserError as e:
        raise ConfigError(f"{where}{e}") from None


def _check_cross_fields(space: Space, where: str):
    """Check the rules that tie fields together on every combination a choice can make."""
    # The keys outside a combination take their first choice: a fixed `pretrained: true` needs a timm arch
    # whichever of the searched ones it is, and never meets the schema's default xresnet50.
    base = {**{k: v.args[0] for k, v in space.searched.items() if v.kind == "choice"}, **space.fixed_values()}
    for keys in (("size", "resize", "pool"), ("arch", "width"), ("arch", "pretrained", "normalize"),
                 ("arch", "pretrained", "freeze_epochs", "epochs")):
        if any(isinstance(space.values.get(k), Dist) and space.values[k].kind != "choice" for k in keys):
            continue  # a sampled size cannot be checked ahead; Config checks each sample
        for combo in itertools.product(*(space.options(k) for k in keys)):
            try:
                Config(**{**base, **dict(zip(keys, combo))})
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
    epochs, freeze = space.values.get("epochs"), space.options("freeze_epochs")
    if isinstance(epochs, Dist) and epochs.kind == "randint" and max(freeze) >= epochs.args[0]:
        raise ConfigError(f"{where}freeze_epochs {max(freeze)} leaves nothing to fine-tune when epochs is "
                          f"{epochs.args[0]} (epochs counts both phases); raise epochs' low end")


def space_path(name_or_path: str) -> Path:
    """A space file by name (`search_spaces/NAME.yaml`) or by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        if not p.is_file():
            raise UserError(f"space file {p} does not exist")
        return p
    p = SPACES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        have = ", ".join(sorted(q.stem for q in SPACES_DIR.glob("*.yaml")))
        raise UserError(f"no search space named '{name_or_path}'; available: {have} (or give a .yaml path)")
    return p


def load_space(name_or_path: str, overrides=()) -> Space:
    """Read and validate a space file (by name or path), then its `--set KEY=VALUE` overrides, checked alike.

    A relative `data:` folder is read from the space file's folder (a `--set data=...` from the working
    directory), so that a space means the same data wherever it is run from.
    """
    p = space_path(name_or_path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: broken YAML{at}: {problem}") from None
    parse_space(raw, name=p.stem, source=str(p))  # the file alone first: its mistakes name the file
    raw, source = _resolve_data(raw, p.resolve().parent), str(p)
    if overrides:
        raw = _resolve_data(apply_overrides(raw, overrides), Path.cwd())
        source = f"{p} with --set {' '.join(overrides)}"
    return parse_space(raw, name=p.stem, source=source)


def _resolve_data(raw: dict, base: Path) -> dict:
    """`raw` with relative `data:` folders (fixed or choices) and a relative `pretrained:` path made absolute
    against `base`."""
    pre = raw.get("pretrained") if isinstance(raw, dict) else None
    if isinstance(pre, str) and pre.strip() and not Path(pre).expanduser().is_absolute():
        raw = {**raw, "pretrained": str((base / pre).resolve())}

    def resolve(v):
        if isinstance(v, dict) or (isinstance(v, str) and v.lstrip().startswith("{")):  # a data mapping
            try:
                return sources.resolve_paths(v, base)
            except UserError:
                return v  # parse_space names what is wrong with it
        if not isinstance(v, str) or sources.known(v) or not v.strip() or Path(v).expanduser().is_absolute():
            return v
        return str((base / v).resolve())

    d = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(d, str) or (isinstance(d, dict) and not set(d) & set(DIST_KINDS)):
        return {**raw, "data": resolve(d)}
    if isinstance(d, dict) and isinstance(d.get("choice"), list):
        prior = {"prior": resolve(d["prior"])} if isinstance(d.get("prior"), str) else {}
        return {**raw, "data": {**d, "choice": [resolve(v) for v in d["choice"]], **prior}}
    return raw


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _numbers(v):
    """YAML 1.1 reads `1e-3` as text; on the command line it is meant as a number."""
    if isinstance(v, str) and _FLOAT.fullmatch(v):
        return float(v)
    if isinstance(v, list):
        return [_numbers(x) for x in v]
    if isinstance(v, dict):
        return {k: _numbers(x) for k, x in v.items()}
    return v


def apply_overrides(raw: dict, overrides) -> dict:
    """`raw` (a space as read from YAML) with `KEY=VALUE` items applied: `lr=0.01`, `search.num_samples=4`,
    `lr={loguniform: [1.0e-3, 1.0e-2]}`; VALUE is YAML. Unknown keys are left for `parse_space` to name."""
    out = dict(raw or {})
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set lr=0.01 or --set search.num_samples=4")
        try:
            value = _numbers(yaml.safe_load(text)) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: {text!r} is not a YAML value; quote it for the shell, e.g. "
                              f"--set 'lr={{loguniform: [1.0e-3, 1.0e-2]}}'") from None
        section, dot, sub = key.partition(".")
        if dot:
            if section not in ("search", "baseline") or "." in sub:
                raise ConfigError(f"--set {item}: {key!r} is not a setting; use a config key (lr=...) or "
                                  f"search.KEY=... / baseline.KEY=...")
            out[section] = {**(out.get(section) or {}), sub: value}
        else:
            out[key] = value
    return out


def space_to_yaml(values: dict[str, Any], search: SearchSettings | None = None,
                  baseline: dict[str, Any] | None = None, **extra) -> str:
    """YAML text of a space or config, in schema order, with optional extra top-level blocks."""
    out = {k: (v.to_yaml() if isinstance(v, Dist) else v) for k, v in values.items()}
    if search is not None:
        out["search"] = dataclasses.asdict(search)
    if baseline is not None:
        out["baseline"] = dict(baseline)
    out.update(extra)
    return yaml.safe_dump(out, sort_keys=False)


def plain(x, nan=math.nan):
    """`x` with numpy/torch scalars as Python values, recursively through mappings and sequences (any
    iterable but a string), and NaN as `nan`: what YAML and `torch.load(weights_only=True)` accept."""
    if isinstance(x, dict):
        return {k: plain(v, nan) for k, v in x.items()}
    if hasattr(x, "__iter__") and not isinstance(x, (str, bytes)) and not hasattr(x, "shape"):
        return [plain(v, nan) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", ()) == ():
        x = x.item()
    return nan if isinstance(x, float) and math.isnan(x) else x


def field_help(cls) -> dict[str, str]:
    """Each field's help text, for --help and the docs."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
