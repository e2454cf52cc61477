"""Starting a search from what earlier ones found: `--warm-start RESULTS_DIR` (repeatable) and
`search.baseline_first`.

The best trials of earlier searches (their confirmed winner first, then their completed trials by
accuracy, taken in turn from each folder) become the first trials of the new study, enqueued through
Optuna's `enqueue_trial` (`searcher.StudySearcher.enqueue`). They are trained again on this search's data
and holdout: their old scores are not reused. Only the keys the new space searches are taken; a value
outside the new range is clipped to it (a choice it lacks becomes the nearest one), and each change is
said in one log line. Keys the new space searches that an old trial lacks are sampled as usual.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tune_sota.config import Dist, Space, UserError

log = logging.getLogger(__name__)


def fit(key: str, value, dist: Dist):
    """(`value` made a value of `dist`, None if it fits as it is, else a note of what changed); a
    value that cannot be made one is (None, note)."""
    if dist.kind == "choice":
        for option in dist.args:
            if option == value or str(option) == str(value):
                return option, None
        numeric = [o for o in dist.args if isinstance(o, (int, float)) and not isinstance(o, bool)]
        if numeric and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            near = min(numeric, key=lambda o: abs(o - value))
            return near, f"{key} {value!r} is not one of {list(dist.args)}: the nearest, {near!r}, is used"
        return None, f"{key} {value!r} is not one of {list(dist.args)}: sampled instead"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None, f"{key} {value!r} is not a number: sampled instead"
    lo, hi = dist.args
    clipped = min(max(v, lo), hi)
    if dist.kind == "randint":
        clipped = int(round(clipped))
    note = None if clipped == v else f"{key} {value!r} is outside [{lo}, {hi}]: clipped to {clipped!r}"
    return clipped, note


def params(space: Space, values: dict, where: str) -> dict:
    """The searched keys of `values`, each fitted to the space (one log line per change)."""
    out = {}
    for key, dist in space.searched.items():
        if key not in values or values[key] is None or (isinstance(values[key], float) and math.isnan(values[key])):
            continue
        v, note = fit(key, values[key], dist)
        if note:
            log.info("tune-sota: warm start: %s: %s", where, note)
        if v is not None:
            out[key] = v
    return out


def _ranked(results_dir: Path) -> list[tuple[str, dict]]:
    """(trial id, its values) of a finished search's completed trials, the confirmed winner first."""
    import yaml

    from tune_sota import results

    try:
        trials = results.load_trials(results_dir)
    except UserError as e:
        raise UserError(f"--warm-start {results_dir}: {e}") from None
    done = trials[trials.status == results.COMPLETED]
    if "confirmed_accuracy" in done:
        done = done.assign(_c=done.confirmed_accuracy.fillna(-1.0)).sort_values(
            ["_c", "accuracy"], ascending=False, kind="stable")
    best = results_dir / "best.yaml"
    rows = [(r.trial_id, r._asdict()) for r in done.itertuples(index=False)]
    if best.is_file():  # the winner as exported (its every value, not only the searched ones)
        block = yaml.safe_load(best.read_text()) or {}
        winner = (block.get("result") or {}).get("trial_id")
        rows = [(winner, {k: v for k, v in block.items() if k != "result"})] + [r for r in rows if r[0] != winner]
    return rows


def plan(space: Space, results_dirs, top: int) -> list[tuple[dict, str]]:
    """(params, where from) of the first trials: the baseline recipe with `search.baseline_first`, then the
    best `top` configs of the earlier searches, taken in turn from each folder, without repeats."""
    first = []
    if space.search.baseline_first:
        base = space.baseline_config()
        # Every searched key at the baseline's value (not only the baseline section's: an arch or an
        # optimizer searched must be the recipe's too); no resizing is the one stage at the final size.
        values = {k: getattr(base, k) for k in space.searched}
        if values.get("resize") == "":
            values["resize"] = str(base.size)
        first.append((params(space, values, "the baseline"), "baseline"))
    ranked = []
    for d in map(Path, results_dirs):
        if not (d / "trials.csv").is_file():
            raise UserError(f"--warm-start {d}: no trials.csv there; give a folder a finished `tune-sota search` "
                            f"wrote, e.g. results/quick")
        ranked.append([(f"{d} trial {tid}", values) for tid, values in _ranked(d)])
    seen = [p for p, _ in first]
    taken = 0
    for i in range(max((len(r) for r in ranked), default=0)):
        for rows in ranked:
            if taken >= top or i >= len(rows):
                continue
            where, values = rows[i]
            p = params(space, values, where)
            if p and p not in seen:
                seen.append(p)
                first.append((p, where))
                taken += 1
    return first
