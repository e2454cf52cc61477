"""`tune-sota gpu-check`: a user's first minute on a GPU machine. What the machine is (device, torch,
CUDA and driver versions, native bf16, free memory), then the space's model trained at its size by 1, 2
and 4 trials at once sharing the GPU through Ray with fractional GPUs (as a search runs them): images/s
each and in total, the share of the time spent waiting for data, peak memory per trial, and whether the
decoded cache went onto the GPU; then advice: the `gpus_per_trial` that gave the most images/s, and
whether NVIDIA's MPS would help.

Without a GPU it says so and runs the same measurement on the CPU at a tiny size (a few small images it
makes itself, fractional CPUs), which is what the tests run. Each trial trains for a fixed window after
a warm-up; the trials of a round start their windows together (a file barrier), so they overlap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tune_sota.config import Config, Space

log = logging.getLogger(__name__)

ROUNDS = (1, 2, 4)  # trials sharing the device
DATA_WAIT_GOAL = 0.05  # the share of a trial's time it may wait for data
MPS_PIPE = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))


@dataclass
class Round:
    """What `trials` trials sharing the device measured, one entry per trial."""

    trials: int
    share: float  # the device share (gpus_per_trial) or CPUs each trial was given
    images_s: list[float]
    data_wait: list[float]
    peak_bytes: list[int]
    cache_on_gpu: list[bool]

    @property
    def total(self) -> float:
        return sum(self.images_s)


@dataclass
class Check:
    """The machine, what was trained, and the rounds."""

    gpu: bool
    machine: list[tuple[str, str]]
    model: str
    pipeline: str = "cached"
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0


def machine() -> tuple[bool, list[tuple[str, str]]]:
    """(whether there is a CUDA GPU, [(what, value)]): device, versions, native bf16, free memory."""
    import torch

    from tune_sota import precision

    rows = [("torch", torch.__version__)]
    if not torch.cuda.is_available():
        cpu = platform.processor() or platform.machine()
        return False, [("device", f"no CUDA GPU: CPU ({cpu}, {os.cpu_count()} cores)"), *rows]
    free, total = torch.cuda.mem_get_info()
    major, minor = torch.cuda.get_device_capability()
    rows += [("CUDA (torch's build)", str(torch.version.cuda)), ("driver", _driver()),
             ("native bf16", f"{'yes' if precision.native_bf16() else 'no (fp16 with a gradient scaler)'} "
                             f"(compute capability {major}.{minor})"),
             ("memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"),
             ("GPUs", str(torch.cuda.device_count())),
             ("NVIDIA MPS", "running" if MPS_PIPE.exists() else "not running")]
    return True, [("device", torch.cuda.get_device_name(0)), *rows]


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return out[0] if out else "unknown (nvidia-smi printed nothing)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def tiny_images(root: Path, per_class: int = 32, px: int = 24) -> Path:
    """train/ and val/ of three classes of small noisy images tinted by class (the CPU check's data)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 4)):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 120, (px, px, 3), dtype=np.uint8)
                img[..., c] += 120
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def check_config(space: Space | None, gpu: bool, data: Path | None = None) -> Config:
    """The config each trial trains: the space's baseline run at its final size (no progressive
    resizing, no MixUp: those change what a step costs, not what the device can do); on a CPU, a tiny
    xresnet18 on `data`."""
    epochs = 1000  # the window ends the fit, not the schedule
    if not gpu:
        return Config(data=str(data), arch="xresnet18", width=0.125, size=16, presize=20, batch_size=16,
                      epochs=epochs, pipeline="cached")
    cfg = space.baseline_config() if space else Config()
    return Config(**{**cfg.to_dict(), "resize": "", "mixup": 0.0, "epochs": epochs, "holdout": 0.0})


def meter(warmup: int, seconds: float, barrier: Path, trials: int):
    """A fastai callback that, after `warmup` training batches, waits for the round's other `trials` at
    `barrier`, then counts images and the time spent waiting for the next batch for `seconds`, and ends
    the fit. (Made here, not at the top: the CLI imports this module without torch and fastai.)"""
    import torch
    from fastai.callback.core import Callback, CancelFitException

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class _Meter(Callback):
        order = -20  # first into a batch, so the wait ends where the batch's work begins

        def before_fit(self):
            self.i, self.images, self.wait, self.t0, self.last = 0, 0, 0.0, None, None

        def before_batch(self):
            if self.training and self.t0 is not None:
                self.wait += time.perf_counter() - self.last

        def after_batch(self):
            if not self.training:
                return
            self.i += 1
            if self.t0 is not None:
                self.images += len(self.yb[0])
            elif self.i == warmup:
                sync()
                _arrive(barrier, trials)
                self.t0 = time.perf_counter()
            self.last = time.perf_counter()
            if self.t0 is not None and self.last - self.t0 >= seconds:
                sync()
                self.seconds = time.perf_counter() - self.t0
                raise CancelFitException()

        def before_validate(self):  # a window spans epochs: validation is neither data nor training
            self.paused = time.perf_counter()

        def after_validate(self):
            if self.t0 is not None:
                self.t0 += time.perf_counter() - self.paused
            self.last = time.perf_counter()

    return _Meter()


def _arrive(barrier: Path, trials: int, timeout: float = 300) -> None:
    """Wait until `trials` trials have arrived at `barrier` (a folder every trial of a round sees)."""
    (barrier / f"{os.getpid()}-{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.iterdir())) < trials and time.monotonic() < deadline:
        time.sleep(0.02)


def trial(cfg: dict, warmup: int, seconds: float, barrier: str, trials: int, cpus: float) -> dict:
    """One trial of a round (in a Ray worker): train `cfg` through a measured window; its figures."""
    import torch

    from tune_sota import recipe

    cfg = Config(**cfg)
    workers, device = recipe.resources(cfg, cpus)
    # Each of `trials` holds 1/trials of the GPU, as a search at that gpus_per_trial: the cache is sized by it
    dls = recipe.make_dataloaders(cfg, workers=workers, device=device, gpu_fraction=1 / trials)
    learn = recipe.build_learner(cfg, dls)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    meter_cb = meter(warmup, seconds, Path(barrier), trials)
    recipe.fit(learn, cfg, [recipe.ProgressiveResize(cfg), meter_cb])  # the space's own schedule
    x = getattr(dls.train.dataset, "x", None)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved()
    else:  # the process's peak resident memory (a reused worker's, so at least the last round's)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"images_s": meter_cb.images / meter_cb.seconds, "data_wait": meter_cb.wait / meter_cb.seconds, "peak": peak,
            "cache_on_gpu": bool(x is not None and x.is_cuda)}


def run(space: Space | None = None, *, seconds: float | None = None, rounds=ROUNDS) -> Check:
    """Measure this machine: see the module's docstring."""
    import ray

    t_start = time.perf_counter()
    gpu, rows = machine()
    tmp = Path(tempfile.mkdtemp(prefix="tune_sota_gpucheck_"))
    cache_env = os.environ.get("TUNE_SOTA_CACHE")
    try:
        if not gpu:  # the tiny data and its cache live and die with the check
            os.environ["TUNE_SOTA_CACHE"] = str(tmp / "cache")
        cfg = check_config(space, gpu, None if gpu else tiny_images(tmp / "tiny"))
        seconds = seconds or (10.0 if gpu else 2.0)
        warmup = 5 if gpu else 2
        _prepare(cfg)
        model = (f"{cfg.arch} width {cfg.width:g} at {cfg.size} px, batch {cfg.batch_size}, {cfg.pipeline} pipeline, "
                 f"precision {cfg.precision}" + ("" if gpu else " (a tiny stand-in: no GPU)"))
        check = Check(gpu=gpu, machine=rows, model=model, pipeline=cfg.pipeline)
        cpus = float(os.cpu_count() or 1)
        ray.init(num_cpus=int(cpus), num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"TUNE_SOTA_CACHE": os.environ.get(
                     "TUNE_SOTA_CACHE", "")}} if not gpu else None)
        try:
            remote = ray.remote(_in_worker)
            for k in rounds:
                barrier = tmp / f"barrier-{k}"
                barrier.mkdir()
                each_cpu = cpus / k
                opts = {"num_cpus": each_cpu, "num_gpus": 1 / k} if gpu else {"num_cpus": each_cpu}
                log.info("gpu-check: %d trial(s) at once, %s each", k,
                         f"{1 / k:g} GPU" if gpu else f"{each_cpu:g} CPUs")
                out = ray.get([remote.options(**opts).remote(cfg.to_dict(), warmup, seconds, str(barrier), k, each_cpu)
                               for _ in range(k)])
                check.rounds.append(Round(k, 1 / k if gpu else each_cpu, [o["images_s"] for o in out],
                                          [o["data_wait"] for o in out], [o["peak"] for o in out],
                                          [o["cache_on_gpu"] for o in out]))
        finally:
            ray.shutdown()
    finally:
        if cache_env is None:
            os.environ.pop("TUNE_SOTA_CACHE", None)
        else:
            os.environ["TUNE_SOTA_CACHE"] = cache_env
        shutil.rmtree(tmp, ignore_errors=True)
    check.seconds = time.perf_counter() - t_start
    return check


def _in_worker(cfg, warmup, seconds, barrier, trials, cpus):
    import warnings

    warnings.filterwarnings("ignore")
    return trial(cfg, warmup, seconds, barrier, trials, cpus)


def _prepare(cfg: Config) -> None:
    """Download the data and build the decoded cache once, in the driver, before any trial times."""
    from tune_sota import cache, sources

    root = sources.prepare_source(cfg.data)
    if cfg.pipeline == "cached":
        with contextlib.suppress(Exception):  # a trial then says what is wrong, in its own words
            cache.build(root, cfg.item_size, ("train", "val"))


def advice(check: Check) -> list[str]:
    """Plain advice from the rounds: trials per device, data waits, MPS."""
    if not check.rounds:
        return []
    one = check.rounds[0]
    best = max(check.rounds, key=lambda r: r.total)
    unit = "gpus_per_trial" if check.gpu else "cpus_per_trial"
    lines = [f"run {best.trials} trial(s) per {'GPU' if check.gpu else 'machine'} ({unit}: {best.share:g}): "
             f"{best.total:,.0f} images/s in total, {best.total / one.total:.2f}x one trial alone"]
    waits = max(max(r.data_wait) for r in check.rounds)
    if waits > DATA_WAIT_GOAL:
        fix = "give each trial more CPUs (cpus_per_trial)" if check.pipeline == "cached" else "use pipeline: cached"
        lines.append(f"trials waited for data up to {waits:.0%} of the time (goal: at most {DATA_WAIT_GOAL:.0%}): "
                     f"{fix}")
    if not check.gpu:
        lines.append("no GPU here, so NVIDIA MPS does not apply; on a GPU machine run this check there")
    elif MPS_PIPE.exists():
        lines.append("NVIDIA MPS is running: these figures are with it")
    elif best.trials > 1 and best.total < 0.6 * best.trials * one.total:
        lines.append("the trials time-slice the GPU rather than share it; NVIDIA MPS lets their kernels run at "
                     "once: start it (nvidia-cuda-mps-control -d) before Ray and run this check again")
    else:
        lines.append("NVIDIA MPS would add little: the trials already scale with their number"
                     if best.trials > 1 else "one trial already fills the GPU; MPS would add little")
    return lines


def report(check: Check) -> str:
    """The check as text: machine, table, advice."""
    from tune_sota.model import human

    width = max(len(k) for k, _ in check.machine)
    lines = [f"{k:<{width}}  {v}" for k, v in check.machine] + ["", f"model: {check.model}", ""]
    each = "GPU each" if check.gpu else "CPUs each"
    lines += [f"| trials | {each} | images/s each | images/s total | x 1 trial | data wait | peak memory each | "
              f"cache on GPU |", "|---|---|---|---|---|---|---|---|"]
    one = check.rounds[0].total if check.rounds else 1.0
    for r in check.rounds:
        lines.append(f"| {r.trials} | {r.share:g} | {sum(r.images_s) / r.trials:,.0f} | {r.total:,.0f} | "
                     f"{r.total / one:.2f} | {max(r.data_wait):.1%} | {human(max(r.peak_bytes))} | "
                     f"{'yes' if all(r.cache_on_gpu) else 'no'} |")
    lines += [""] + [f"advice: {a}" for a in advice(check)]
    lines.append(f"(checked in {check.seconds:.0f} s)")
    return "\n".join(lines)
