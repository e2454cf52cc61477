"""What a `pretrained:` value means, in one place: where the weights come from, what normalization
statistics come with them, and how they go into a model (README, Fine-tuning).

- `true`: the timm model's published weights, through the Hugging Face cache. The search's driver (or
  `tune-sota train`) resolves them once, before Ray starts (`check`): from the cache, else one download;
  with no network it stops with one line. A trial only reads the cache (`hub_file(download=False)`), so
  no worker downloads.
- a weights file: safetensors or a torch state dict. For a timm model it is loaded the way timm loads a
  published file (`pretrained_cfg_overlay=dict(file=...)`: its classifier dropped, fastai's head added);
  for fastai's xresnet it is the state dict of `recipe.make_model`'s model, its head replaced.
- a tune_sota model: anything `load_model` accepts (a `train --out` or trial folder, a best.yaml) or an
  export (folder or export.pkl). It must be the same model (arch, width...); its head is kept when it
  was trained on the same classes, else replaced, and the log says which.

Light imports at the top (no torch, no timm), so that the CLI's checks stay fast.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tune_sota.config import ARCHS, Config, UserError

log = logging.getLogger(__name__)

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # fastai's imagenet_stats
# What makes one model the same as another: a tune_sota model fine-tuned on must match in these
SHAPE_KEYS = ("arch", "width", "act", "sa", "pool")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Weights:
    """Resolved weights: a file or a state dict's source, the classes its head was trained on (None
    when unknown) and the normalization statistics that go with it (None: the model's or ImageNet's)."""

    kind: str  # "hub", "file" (a weights file), "model" (tune_sota state.pt), "export" (export.pkl)
    path: Path
    classes: tuple[str, ...] | None = None
    stats: tuple[list[float], list[float]] | None = None
    config: Config | None = None  # a tune_sota model's own config


def _hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def _offline_line(arch: str, repo: str, why: str) -> str:
    from huggingface_hub import constants

    return (f"pretrained: true: the published weights of {arch} ({repo}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and cannot be downloaded ({why}); on a machine with network run it once to "
            f"fill that cache (set HF_HOME to move it; HF_HUB_OFFLINE=1 then reads it without asking the network), "
            f"or give pretrained: PATH (a safetensors or torch state dict file, or a tune_sota model)")


def hub_file(arch: str, *, download: bool) -> Path:
    """The cached file of timm model `arch`'s published weights; when `download`, fetched once if missing.
    UserError with no network and no cache (one line: the cache folder, HF_HUB_OFFLINE, the PATH way)."""
    import timm
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise UserError(f"pretrained: true: timm publishes no Hugging Face weights for {arch}; give pretrained: "
                        f"PATH (a weights file) or another arch")
    repo, _, revision = repo.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        hit = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    if not download:
        raise UserError(_offline_line(arch, repo, "this worker reads the cache only: the search's driver "
                                                  "downloads, or give a PATH on storage every node reads"))
    if constants.HF_HUB_OFFLINE:
        raise UserError(_offline_line(arch, repo, "HF_HUB_OFFLINE is set"))
    host = _hub_host()
    try:  # a quick look for the network first: the hub client retries for half a minute before it gives up
        socket.create_connection((host, urlparse(constants.ENDPOINT).port or 443), timeout=5).close()
    except OSError as e:
        raise UserError(_offline_line(arch, repo, f"{host} unreachable: {e}")) from None
    try:
        return Path(hf_hub_download(repo, names[0], revision=revision or None, etag_timeout=10))
    except Exception as e:
        raise UserError(_offline_line(arch, repo, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")) from None


def _export_file(p: Path) -> Path | None:
    if p.is_file() and p.suffix == ".pkl":
        return p
    if p.is_dir() and (p / "export.pkl").is_file():
        return p / "export.pkl"
    return None


@functools.lru_cache(maxsize=8)
def resolve(value, arch: str, *, download: bool = False) -> Weights | None:
    """The weights a `pretrained:` value names for model `arch`; None for false. UserError when they
    cannot be had or do not fit (`download`: only the driver may fetch published weights)."""
    if value is False:
        return None
    if value is True:
        return Weights("hub", hub_file(arch, download=download))
    p = Path(value).expanduser()
    if not p.exists():
        raise UserError(f"pretrained: {p} does not exist; give a weights file (safetensors or a torch state dict), a "
                        f"tune_sota model folder, a best.yaml or an export.pkl")
    if (pkl := _export_file(p)) is not None:
        return _from_export(pkl, arch)
    if p.is_file() and p.suffix not in (".yaml", ".yml"):
        blob = _read_state(p)
        if isinstance(blob.get("model"), dict):  # a tune_sota state.pt given by its file
            return Weights("model", p, _tuple(blob.get("classes")), _stats(blob.get("stats")))
        return Weights("file", p)
    from tune_sota.saved import locate  # a model folder, a trial, a best.yaml

    state_file, prev = locate(p)
    _check_same_model(prev, arch, p)
    blob = _read_state(state_file)
    stats = _stats(blob.get("stats"))
    if stats is None:  # a model saved before its statistics were kept
        stats = IMAGENET_STATS
        if prev.normalize != "imagenet":
            log.warning("pretrained: %s was trained with normalize: %s and kept no statistics; using ImageNet's",
                        p, prev.normalize)
    return Weights("model", state_file, _tuple(blob.get("classes")), stats, prev)


def _tuple(x):
    return None if x is None else tuple(str(c) for c in x)


def _stats(x):
    return None if not x else (list(map(float, x[0])), list(map(float, x[1])))


def _check_same_model(prev: Config, arch: str, where) -> None:
    if prev.arch != arch:
        raise UserError(f"pretrained: {where} is a {prev.arch} but arch is {arch}; set arch: {prev.arch} (and "
                        f"{', '.join(f'{k}: {getattr(prev, k)}' for k in SHAPE_KEYS[1:])}) to fine-tune it")


def _from_export(pkl: Path, arch: str) -> Weights:
    about = pkl.parent / "classes.json"
    meta = json.loads(about.read_text()) if about.is_file() else {}
    prev = Config(**meta["config"]) if "config" in meta else None
    if prev is not None:
        _check_same_model(prev, arch, pkl)
    classes = _tuple(meta.get("classes"))
    stats = (meta["mean"], meta["std"]) if "mean" in meta else None
    return Weights("export", pkl, classes, stats, prev)


def _read_state(path: Path) -> dict:
    """A weights file as a dict: safetensors, or torch's (tensors and plain values only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"pretrained: {path} is not a safetensors or torch state dict file ({type(e).__name__}); "
                        f"give a weights file, a tune_sota model folder, a best.yaml or an export.pkl") from None
    if not isinstance(blob, dict):
        raise UserError(f"pretrained: {path} holds a {type(blob).__name__}, not a state dict")
    return blob


def state_dict(w: Weights) -> dict:
    """The model's tensors of resolved weights (a tune_sota model's, an export's, or a file's)."""
    if w.kind == "export":
        import torch
        from fastai.learner import load_learner

        model = load_learner(w.path, cpu=True).model  # Sequential(Upsample, the model): export.inference_learner
        inner = model[1] if isinstance(model, torch.nn.Sequential) and len(model) == 2 else model
        return inner.state_dict()
    blob = _read_state(w.path)
    return blob["model"] if isinstance(blob.get("model"), dict) else blob


def stats(cfg: Config) -> tuple[list[float], list[float]]:
    """The normalization statistics of `cfg`'s pretrained weights: the tune_sota model's own, else the timm
    model's published ones, else ImageNet's."""
    w = resolve(cfg.pretrained, cfg.arch)
    if w is not None and w.stats is not None:
        return w.stats
    if cfg.arch not in ARCHS:
        import timm

        pc = timm.get_pretrained_cfg(cfg.arch)
        if pc is not None and pc.mean and len(pc.mean) == 3:
            return list(pc.mean), list(pc.std)
    return IMAGENET_STATS


def head_keys(model) -> set[str]:
    """The state-dict keys of the model's head, the part a new set of classes replaces: fastai's head
    on a timm body (`model[1]`), the final Linear of an xresnet."""
    last = len(model) - 1
    return {k for k in model.state_dict() if k.split(".")[0] == str(last)}


def load_into(model, w: Weights, classes: list[str]) -> str:
    """Load the tensors of `w` into `model` (the head too when `w` was trained on `classes`); returns what
    it did, for the log. UserError when the weights are of another model."""
    import torch

    sd = state_dict(w)
    own = model.state_dict()
    head = head_keys(model)
    keep_head = w.classes is not None and list(w.classes) == list(classes)
    wrong = [k for k in own if k not in head and (k not in sd or sd[k].shape != own[k].shape)]
    if wrong:
        k = wrong[0]
        got = tuple(sd[k].shape) if k in sd else "missing"
        raise UserError(f"pretrained: {w.path} does not fit this {type(model).__name__}: {len(wrong)} of its "
                        f"{len(own)} tensors differ (first: {k}: {got} vs {tuple(own[k].shape)}); give weights of "
                        f"the same arch and width")
    take = {k: v for k, v in sd.items() if k in own and (keep_head or k not in head)}
    with torch.no_grad():
        model.load_state_dict({**own, **take})
    if keep_head:
        return f"{w.path}: all weights, head included (same {len(classes)} classes)"
    was = f"{len(w.classes)} classes" if w.classes is not None else "unknown classes"
    return f"{w.path}: body loaded, head replaced ({was} -> {len(classes)} classes)"
