"""search_efficiency: does ASHA + TPE told the truth about stopped trials (tune_sota's search) find a
good recipe for less compute than its alternatives? Runs real searches of one space, the same number of
trials on the same resources, with each method and several searcher seeds, and measures at every
trial's end what the method would choose (the completed trial best on the holdout) and what that
choice scores on val/ (its final checkpoint; no retraining), against the trial-seconds spent so far.

    python bench/search_efficiency.py                  # 5 methods x 3 seeds, 10 trials each, ../shared/data
    python bench/search_efficiency.py --quick --no-record   # a tiny setting that checks the script end to end
    python bench/search_efficiency.py --trials 32 --size 64 --epochs-max 12 \
        --set width=1.0 --set search.max_concurrent=4 --set search.gpus_per_trial=0.25   # larger, on a GPU

| method | scheduler | searcher |
| random | fifo (no early stopping) | random |
| ASHA + random | tune_sota's schedule-fair ASHA | random |
| ASHA + stock TPE | tune_sota's ASHA | Ray's OptunaSearch (stopped trials told as COMPLETE) |
| naive ASHA + TPE | Ray's ASHAScheduler on epoch counts | tune_sota's (stopped trials PRUNED) |
| tune_sota | tune_sota's ASHA | tune_sota's |

The space is imagenette-cpu's, shrunk: learning rate loguniform [1e-4, 5e-2] (wide enough for clearly
bad trials), epochs randint [2, --epochs-max], --size px. Trials are judged on its holdout (10% of
train/); nothing is confirmed (`confirm_top: 0`): the chosen trial's own last checkpoint is scored on
val/ (plainly, no TTA), once per trial. Every trial trains with the config's one seed, so a config
trains to the same model whichever method proposed it; with one searcher seed, `random` and
`ASHA + random` propose the same configs in the same order (and the TPE methods the same first
`startup_trials`), so methods differ by what they stop and what TPE proposes after that.

The table's "to within 1 point" is the trial-seconds after which the seeds' mean chosen val/ accuracy
first reaches the best final mean of any method less 0.01. The last line is tune_sota's figure over
random's; `<` or `>` before it marks a bound, when one of the two never got there in its searches.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import BENCH, record, shared_data, table

SPACE = "imagenette-cpu"
# name: (label, scheduler, searcher); tune_sota last so that its line is drawn on top
METHODS = {
    "random": ("random", "fifo", "random"),
    "asha-random": ("ASHA + random", "asha", "random"),
    "asha-stock-tpe": ("ASHA + stock TPE", "asha", "ray-optuna"),
    "naive-asha-tpe": ("naive ASHA + TPE", "ray-asha", "tpe"),
    "tune_sota": ("tune_sota", "asha", "tpe"),
}
WITHIN = 0.01  # "within 1 point": one percentage point of accuracy
QUICK = {"seeds": "1", "trials": 4, "epochs_max": 3, "size": 24, "per_class": (40, 20)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="3", help="searcher seeds per method: a count N (seeds 0..N-1) or a list "
                   "'4,7,9' (default 3)")
    p.add_argument("--trials", type=int, default=10, help="trials per search (default 10)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--epochs-max", type=int, default=6, help="epochs searched over randint [2, this] (default 6)")
    p.add_argument("--size", type=int, default=24, help="final image size in px; presize 4/3 of it (default 24)")
    p.add_argument("--quick", action="store_true", help="a tiny setting to check the script: 1 seed, 4 trials, "
                   "epochs [2, 3], 40+20 images per class (linked from --data); explicit flags still win")
    p.add_argument("--data", help="Imagenette folder with train/ and val/ (default: ../shared/data/imagenette2-128)")
    p.add_argument("--workdir", help="where the searches, the decoded cache (unless TUNE_SOTA_CACHE is set) and "
                   "runs.json go (default: a new temporary folder, kept)")
    p.add_argument("--plot", help="the curve's PNG (default: bench/search_efficiency.png; with --no-record, "
                   "WORKDIR/search_efficiency.png)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other change to the "
                   "space, as `tune-sota search --set` takes it (width=0.5, search.max_concurrent=4, "
                   "search.gpus_per_trial=0.5, search.grace=0.33...); repeatable. scheduler, searcher and seed "
                   "are the methods' own")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.quick:  # the quick setting replaces only what was not given on the command line
        for k in ("seeds", "trials", "epochs_max", "size"):
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, QUICK[k])
    seeds = _seeds(args.seeds)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; use some of {', '.join(METHODS)}")
    if args.epochs_max < 2:
        p.error("--epochs-max: at least 2 (epochs are searched over randint [2, epochs-max])")
    warnings.filterwarnings("ignore")

    from tune_sota.config import UserError

    data = shared_data(args.data)
    try:
        space = make_space(data, size=args.size, epochs_max=args.epochs_max, trials=args.trials, extra=args.set)
    except UserError as e:
        p.error(str(e))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tune_sota_efficiency_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNE_SOTA_CACHE", str(work / "cache"))  # one decode for every search and score
    if args.quick:
        data = _subset(data, work / "data", QUICK["per_class"])
        space.values["data"] = str(data)
    print(f"search_efficiency: {len(methods)} methods x {len(seeds)} seeds, {args.trials} trials each, "
          f"{space.values['arch']} x{space.values['width']} at {args.size} px, epochs [2, {args.epochs_max}], "
          f"on {data}; work in {work}", flush=True)

    runs, scores = [], {}
    for seed in seeds:  # seed-major: a run cut short still has every method for the seeds it finished
        for method in methods:
            runs.append(run_one(space, method, seed, work, scores))
            (work / "runs.json").write_text(json.dumps(runs, indent=1))

    plot = Path(args.plot) if args.plot else (work if args.no_record else BENCH) / "search_efficiency.png"
    draw(runs, methods, plot)
    body = report(runs, methods, space, data, args, plot)
    print(f"\ncurve: {plot}\nruns: {work / 'runs.json'}\n\n{body}", flush=True)
    if not args.no_record:
        record("search_efficiency: what each search method chooses for the compute it spends", body)


def _seeds(text: str) -> list[int]:
    """`3` -> [0, 1, 2]; `4,7` -> [4, 7]."""
    parts = [int(s) for s in str(text).split(",") if s.strip()]
    return list(range(parts[0])) if len(parts) == 1 else parts


def _subset(root: Path, to: Path, per_class: tuple[int, int]) -> Path:
    """A small copy of `root` made of links: the first `per_class` images of each class in train/ and val/."""
    for split, n in zip(("train", "val"), per_class):
        for cls in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            dest = to / split / cls.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                if not (dest / f.name).exists():
                    (dest / f.name).symlink_to(f.resolve())
    return to


def make_space(data: Path, *, size: int, epochs_max: int, trials: int, extra=()):
    """imagenette-cpu shrunk to a CPU benchmark: a learning-rate range wide enough for clearly bad trials,
    epochs [2, epochs_max], resize stages ending at `size`; validated like any `--set`."""
    from tune_sota.config import load_space

    presize = int(round(size * 4 / 3))
    stages = [f"{size}", f"{size // 2}>{size}", f"{3 * size // 4}>{size}"]
    overrides = [f"data={data}", f"size={size}", f"presize={presize}", "lr={loguniform: [1.0e-4, 5.0e-2]}",
                 f"epochs={{randint: [2, {epochs_max}]}}", f"resize={{choice: {json.dumps(stages)}}}",
                 f"search.num_samples={trials}", "search.select_on=holdout", "search.confirm_top=0",
                 "search.keep_checkpoints=all"]
    return load_space(SPACE, [*overrides, *extra])


def _say(prefix: str, line: str) -> None:
    """A search's progress line, prefixed by its method and seed (module-level: Tune pickles it)."""
    print(f"{prefix} {line}", flush=True)


def run_one(space, method: str, seed: int, work: Path, scores: dict) -> dict:
    """One search of `method` with searcher `seed`; its trials in the order they ended, with what the
    method would choose after each and that choice's val/ accuracy."""
    from tune_sota import search
    from tune_sota.results import COMPLETED, load_trials

    label, sched, searcher = METHODS[method]
    space = dataclasses.replace(space, search=dataclasses.replace(space.search, scheduler=sched, searcher=searcher,
                                                                  seed=seed))
    name = f"{method}-s{seed}"
    t0 = time.time()
    outcome = search.run(space, name=name, results_root=work / "results", out=functools.partial(_say, f"[{name}]"),
                         command=f"bench/search_efficiency.py ({method}, searcher seed {seed})")
    trials = load_trials(outcome.results_dir)
    ended = []
    for row in trials.to_dict("records"):
        ended.append({**row, "end": _ended_at(Path(row["path"])), "time_s": _num(row["time_s"])})
    ended.sort(key=lambda r: (r["end"], r["time_s"]))

    steps, best, cum_s, cum_epochs = [], None, 0.0, 0
    for r in ended:
        cum_s += r["time_s"]
        cum_epochs += int(r["epochs_run"])
        if r["status"] == COMPLETED and (best is None or r["accuracy"] > best["accuracy"]):
            best = r
        val = score_trial(Path(best["path"]), scores) if best is not None else None
        steps.append({"trial_id": r["trial_id"], "status": r["status"], "trial_s": cum_s, "trial_epochs": cum_epochs,
                      "wall_s": (r["end"] - t0) if math.isfinite(r["end"]) else None,
                      "chosen": best["trial_id"] if best is not None else None,
                      "chosen_holdout": float(best["accuracy"]) if best is not None else None, "chosen_val": val})
    for r in ended:  # every checkpoint that can be chosen has been scored: free the disk for the next search
        for ckpt in Path(r["path"]).glob("checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    run = {"method": method, "label": label, "seed": seed, "wall_s": outcome.wall_s, "trials": len(trials),
           "stopped": int((trials.status == "stopped").sum()), "completed": int((trials.status == COMPLETED).sum()),
           "failed": int(trials.status.isin(["error", "diverged"]).sum()), "steps": steps}
    last = steps[-1] if steps else {}
    holdout, val = (math.nan if last.get(k) is None else last[k] for k in ("chosen_holdout", "chosen_val"))
    print(f"[{name}] done in {outcome.wall_s:.0f} s: {run['completed']} completed, {run['stopped']} stopped; "
          f"{last.get('trial_s', 0):.0f} trial-s; chooses {last.get('chosen')} (holdout {holdout:.4f}, val/ {val:.4f})",
          flush=True)
    return run


def _num(v) -> float:
    v = float(v)
    return 0.0 if math.isnan(v) else v


def _ended_at(trial_dir: Path) -> float:
    """When a trial ended (inf when it never reported), from Ray's result.json: each result stamps whole
    seconds (`timestamp`), too coarse for two trials that end together, and the trial's own clock
    (`time_total_s`); every result bounds the end to a one-second window, and the windows intersect."""
    f = trial_dir / "result.json"
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    rows = [r for r in rows if "timestamp" in r and "time_total_s" in r]
    if not rows:
        return math.inf
    total = rows[-1]["time_total_s"]
    lo = max(r["timestamp"] + total - r["time_total_s"] for r in rows)
    hi = min(r["timestamp"] + 1 + total - r["time_total_s"] for r in rows)
    return (lo + hi) / 2 if lo < hi else rows[-1]["timestamp"] + 0.5


def score_trial(trial_dir: Path, scores: dict) -> float:
    """val/ accuracy of a trial's last checkpoint, plainly (its config with holdout 0); each trial once."""
    from tune_sota import recipe
    from tune_sota.config import Config
    from tune_sota.trainable import STATE_FILE

    key = str(trial_dir)
    if key not in scores:
        ckpt = max(trial_dir.glob("checkpoint_*"), key=lambda d: d.name)
        params = json.loads((trial_dir / "params.json").read_text())
        cfg = Config(**{**params, "holdout": 0.0})
        blob = (ckpt / STATE_FILE).read_bytes()
        if recipe.checkpoint_epoch(blob) != cfg.epochs:
            raise RuntimeError(f"{ckpt}: checkpoint after {recipe.checkpoint_epoch(blob)} of {cfg.epochs} epochs; "
                               f"a completed trial's last checkpoint should have all of them")
        scores[key] = recipe.evaluate(cfg, blob, cpus=os.cpu_count(), tta=False)["accuracy"]
    return scores[key]


def value_at(run: dict, x: float, spent: str = "trial_s") -> float:
    """The chosen config's val/ accuracy once `x` of `spent` (trial_s or trial_epochs) is spent (NaN before
    the first choice; the final choice after the search ended)."""
    v = math.nan
    for s in run["steps"]:
        if s[spent] > x + 1e-9:
            break
        v = s["chosen_val"] if s["chosen_val"] is not None else math.nan
    return v


def mean_curve(runs: list[dict], xs, spent: str = "trial_s") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, min, max) over seeds of the chosen val/ accuracy at each x; NaN until every seed has chosen."""
    v = np.array([[value_at(r, x, spent) for x in xs] for r in runs])
    ok = ~np.isnan(v).any(axis=0)
    nan = np.full(len(xs), np.nan)
    if not ok.any():
        return nan, nan, nan
    mean, lo, hi = nan.copy(), nan.copy(), nan.copy()
    mean[ok], lo[ok], hi[ok] = v[:, ok].mean(axis=0), v[:, ok].min(axis=0), v[:, ok].max(axis=0)
    return mean, lo, hi


def needed(runs: list[dict], target: float, spent: str = "trial_s") -> float | None:
    """`spent` (trial_s or trial_epochs) after which the seeds' mean chosen val/ accuracy first reaches
    `target` (None: never)."""
    xs = sorted({s[spent] for r in runs for s in r["steps"]})
    mean = mean_curve(runs, xs, spent)[0]
    hit = [x for x, m in zip(xs, mean) if not math.isnan(m) and m >= target - 1e-12]
    return hit[0] if hit else None


def _rel(path: Path) -> str:
    """`path` from the project root when it is beside or under it (../shared/...), else as it is."""
    rel = os.path.relpath(Path(path).resolve(), BENCH.parent)
    return rel if not rel.startswith("../..") else str(path)


def _by_method(runs: list[dict], methods: list[str]) -> dict[str, list[dict]]:
    return {m: [r for r in runs if r["method"] == m and r["steps"]] for m in methods}


def _finals(groups: dict[str, list[dict]]) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
    """Each method's final chosen val/ accuracy per seed, their means, and the target: the best mean less 1 point."""
    finals = {m: np.array([r["steps"][-1]["chosen_val"] if r["steps"][-1]["chosen_val"] is not None else math.nan
                           for r in rs]) for m, rs in groups.items() if rs}
    means = {m: float(np.nanmean(f)) for m, f in finals.items() if not np.isnan(f).all()}
    return finals, means, (max(means.values()) - WITHIN if means else math.nan)


def draw(runs: list[dict], methods: list[str], path: Path) -> None:
    """Mean (line) and min-max over seeds (band) of the chosen val/ accuracy against trial-seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    groups = _by_method(runs, methods)
    target = _finals(groups)[2]
    if math.isfinite(target):
        ax.axhline(target, color="grey", ls=":", lw=1, label="best final mean less 1 point")
    for method, rs in groups.items():
        if not rs:
            continue
        end = max(r["steps"][-1]["trial_s"] for r in rs)
        xs = np.linspace(0, end, 300)
        mean, lo, hi = mean_curve(rs, xs)
        line, = ax.step(xs, mean, where="post", label=f"{METHODS[method][0]} ({len(rs)} seeds)",
                        lw=2.2 if method == "tune_sota" else 1.4)
        ax.fill_between(xs, lo, hi, step="post", alpha=0.15, color=line.get_color())
    ax.set_xlabel("cumulative trial-seconds (every trial that ended, stopped ones included)")
    ax.set_ylabel("val/ accuracy of the chosen config")
    ax.set_title("What each search would choose for the compute spent\n(best on the holdout so far; line: mean, "
                 "band: min-max over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(runs: list[dict], methods: list[str], space, data: Path, args, plot: Path) -> str:
    """The table, the setting, and the last line: tune_sota's compute to within 1 point as a share of random's."""
    groups = _by_method(runs, methods)
    finals, means, target = _finals(groups)
    need = {m: needed(rs, target) for m, rs in groups.items() if rs}
    need_epochs = {m: needed(rs, target, "trial_epochs") for m, rs in groups.items() if rs}
    spent = {m: float(np.mean([r["steps"][-1]["trial_s"] for r in rs])) for m, rs in groups.items() if rs}
    epochs = {m: float(np.mean([r["steps"][-1]["trial_epochs"] for r in rs])) for m, rs in groups.items() if rs}
    # A mean curve that never got within 1 point was followed as far as its longest seed went: the
    # method needed more than that.
    reach = {m: max(r["steps"][-1]["trial_s"] for r in rs) for m, rs in groups.items() if rs}
    reach_epochs = {m: max(r["steps"][-1]["trial_epochs"] for r in rs) for m, rs in groups.items() if rs}

    rows = []
    for m, rs in groups.items():
        if not rs:
            continue
        f = finals[m]
        sd = float(np.nanstd(f, ddof=1)) if np.sum(~np.isnan(f)) > 1 else 0.0
        n, ne = need[m], need_epochs[m]
        of_random = (f"{n / need['random']:.2f}" if n is not None and need.get("random") else "")
        rows.append([METHODS[m][0], f"{METHODS[m][1]} / {METHODS[m][2]}", len(rs),
                     f"{means.get(m, math.nan):.4f} ± {sd:.4f}", f"{spent[m]:,.0f}", f"{epochs[m]:.1f}",
                     f"{np.mean([r['stopped'] for r in rs]):.1f}", f"{np.mean([r['wall_s'] for r in rs]):,.0f}",
                     f"{n:,.0f}" if n is not None else f"never (> {reach[m]:,.0f})", of_random,
                     f"{ne:.0f}" if ne is not None else f"never (> {reach_epochs[m]:.0f})"])
    body = table(["method", "scheduler / searcher", "seeds", "chosen val/ accuracy (mean ± std)", "trial-s spent",
                  "trial-epochs spent", "stopped early", "wall s", "trial-s to within 1 point", "of random's",
                  "trial-epochs to within 1 point"], rows)
    s = space.search
    searched = ", ".join(f"{k} {d.kind} {list(d.args)}" for k, d in space.searched.items())
    gpus = f" and {s.gpus_per_trial:g} GPU" if s.gpus_per_trial else ""
    body += (f"\n\n- {args.trials} trials per search, {s.max_concurrent or 'as many as fit'} at once of "
             f"{s.cpus_per_trial:g} CPU{gpus} each; searcher seeds {', '.join(str(x) for x in _seeds(args.seeds))}; "
             f"{space.values['arch']} x{space.values['width']} at {space.values['size']} px (presize "
             f"{space.values['presize']}); searched: {searched}; grace {s.grace}, rf {s.reduction_factor}, "
             f"{s.startup_trials} startup trials; trials judged on a {s.holdout:.0%} holdout of train/, the chosen "
             f"trial's last checkpoint scored on val/ ({_rel(data)}), no TTA"
             f"\n- 'within 1 point': the seeds' mean chosen val/ accuracy at or above {target:.4f} (the best final "
             f"mean, {target + WITHIN:.4f}, less 0.01); trial-s are summed over trials in the order they ended, "
             f"stopped ones included; wall s includes Ray's start-up per search"
             f"\n- curve: {_rel(plot)}")
    if "tune_sota" in groups and "random" in groups and groups["tune_sota"] and groups["random"]:
        mine, theirs = need["tune_sota"], need["random"]
        # A method that never got within 1 point needed more than its reach: the share is then a bound.
        if mine is None and theirs is None:
            share, note = "n/a", "neither tune_sota nor random came within 1 point"
        elif mine is None:
            share, note = f">{reach['tune_sota'] / theirs:.2f}", "tune_sota never came within 1 point: a lower bound"
        elif theirs is None:
            share, note = f"<{mine / reach['random']:.2f}", "random never came within 1 point: an upper bound"
        else:
            share, note = f"{mine / theirs:.2f}", ""
        if note:
            body += f"\n- {note}"
        body += f"\n\ncompute to within 1 point: tune_sota {share} of random's"
    return body


if __name__ == "__main__":
    main()
