"""Where a saved model's weights and config are, for anything `load_model` accepts: a `tune-sota train --out`
folder (`state.pt` and `config.yaml`), a search's trial folder (its newest checkpoint) or checkpoint folder
(the trial's `params.json` one level up), or a best.yaml (its `checkpoint:`). Below `model` (which loads
them) and `pretrained` (which starts a fine-tune from them), so that neither imports the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tune_sota.config import Config, UserError, load_space

STATE_FILE = "state.pt"  # the same name as a trial checkpoint's (trainable.STATE_FILE)
CONFIG_FILE = "config.yaml"
PARAMS_FILE = "params.json"  # Ray's record of a trial's config, in the trial folder


def _config_from_params(params_file: Path) -> Config:
    params = json.loads(params_file.read_text())
    if isinstance(params.get("run"), dict):  # a confirmation run: its config is inside the run spec
        params = params["run"].get("config", {})
    known = Config.__dataclass_fields__
    return Config(**{k: v for k, v in params.items() if k in known})


def _newest_checkpoint(trial_dir: Path) -> Path | None:
    found = [p for p in trial_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) if found else None


def locate(path) -> tuple[Path, Config]:
    """(the state.pt file, the Config that rebuilds its Learner) for anything `load_model` accepts."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".yaml", ".yml"):  # best.yaml: the confirmed model, else the winning trial
        result = (yaml.safe_load(p.read_text()) or {}).get("result") or {}
        checkpoint = result.get("confirmed_checkpoint") or result.get("checkpoint")
        if not checkpoint:
            raise UserError(f"{p} names no checkpoint; train it into a model: tune-sota train --config {p} --out DIR")
        return locate(checkpoint)
    if not p.is_dir():
        raise UserError(f"{p} does not exist; give a `tune-sota train --out` folder, a trial folder or checkpoint "
                        f"of a search, or a best.yaml")
    if not (p / STATE_FILE).is_file():
        newest = _newest_checkpoint(p)
        if newest is None:
            raise UserError(f"{p} holds no {STATE_FILE} and no checkpoint_*/{STATE_FILE} (a search keeps the "
                            f"checkpoints of its best trials only, unless search.keep_checkpoints is all)")
        p = newest
    if (p / CONFIG_FILE).is_file():
        return p / STATE_FILE, load_space(str(p / CONFIG_FILE)).fixed()
    if (p.parent / PARAMS_FILE).is_file():
        return p / STATE_FILE, _config_from_params(p.parent / PARAMS_FILE)
    raise UserError(f"{p} has {STATE_FILE} but no {CONFIG_FILE} beside it nor {PARAMS_FILE} above it, so its "
                    f"Learner cannot be rebuilt")
