"""What is the search worth? Replays searches on the recorded learning curves (bench/curves/curves.csv.gz,
from bench/record_curves.py) with tune_sota.simulator: the product's own ScheduleASHA and StudySearcher
(and Ray's stock ASHA and OptunaSearch) decide, a surrogate fitted on the table trains, a simulated
clock counts the compute.

    python bench/simulate.py --seeds 20                 # the figures and, last, the ratio line
    python bench/simulate.py --seeds 50 --record        # ...and append them to bench/RESULTS.md
    python bench/simulate.py --synthetic 80 --seeds 5   # a dry run on a made-up table (no recording needed)
    python bench/simulate.py --table bench/curves-quarter/curves.csv.gz --json sim.json   # the second task

For each setting (trials x workers, default the shipped spaces' 12x2 and 32x4) and method, `--seeds` searches
are simulated, the first setting's run on to `--extend` times the compute of its trial budget (that many
random trials run to their end, on average; the others' to 3x) so that a slow method still shows when it gets
within 1 point, and every method gets the same compute: one that spends less per trial runs more trials.
Reported over seeds as an interquartile mean with a bootstrap 95% interval (rliable's aggregate): the regret
of the chosen config (its predicted val/ accuracy below the best in the space, in points) once the budget's
trials have ended, the compute that took, and the compute until the choice first came within 1 point; and,
seed by seed, each method's regret minus random search's (each --sweep candidate's minus the shipped
method's), which is what decides between two. Then the rungs: a single ScheduleASHA rung at each share tried,
with random proposals (identical with and without the rung), how often it cuts the trial FIFO would have
chosen, what that costs in regret and what it saves. Figures go to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, record, table  # noqa: E402

from tune_sota import simulator as sim  # noqa: E402
from tune_sota.config import UserError  # noqa: E402

DEFAULT_METHODS = "random,tune_sota,tpe,random+asha,tpe+ray-asha,ray-optuna+asha"
TARGET = 0.01  # "within 1 point"
GRID = 60  # points of the anytime curves
# the ratio's setting runs on to this many times its budget's compute (compute to within 1 point): one config
# in a thousand is within 1 point, so random search rarely gets there; at 8x 19 of 20 random seeds never did,
# at 20x 17 of 20 (the 150-trial table), and 20x costs about half a minute per method at --seeds 20
EXTEND = 20.0
SWEEP_EXTEND = 3.0  # enough for every method to reach random's compute at the budget
MORE_TRIALS = 3  # a search run on by compute may start up to this many times its compute's worth of trials
MODEL: sim.Surrogate | None = None  # set in the parent before the pool forks: every worker shares it


CONFIRMS = [(0, 0), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)]  # (confirm_top, confirm_seeds)


def _job(args: tuple) -> dict:
    """One simulated search (in a worker)."""
    kind, setting, name, method, seed, trials, workers, budget, compute = args
    run = sim.simulate(MODEL, method, seed=seed, workers=workers, trials=trials, compute=compute)
    out = {"kind": kind, "setting": setting, "method": name, "seed": seed, "regret": run.regret_of(budget),
           "compute": run.compute_of(budget),
           "stopped": sum(t["stopped"] for t in run.first(budget)) / budget, "events": run.events}
    # (the searcher, with its study, stays here: it does not pickle back to the parent)
    if kind == "rung":
        out["trials"] = run.trials
    if kind in ("method", "valid") and name == "tune_sota":  # the confirmation replayed on this search, and the choice
        rng = np.random.default_rng([seed, 7])
        out["confirm"] = {tc: sim.confirm(MODEL, run, budget, top=tc[0], seeds=tc[1], rng=rng) for tc in CONFIRMS}
        c = run.choice(budget)
        out["chosen_val"] = c["value"] + float(rng.normal(0, MODEL.noise["val"])) if c else math.nan
    return out


def parse_settings(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def method_table(res: pd.DataFrame, methods: list[str], budget: int, label=None, ref: str | None = None
                 ) -> tuple[str, dict, float, dict, dict]:
    """The markdown table of one setting, and each method's compute-to-target values. 'At equal compute':
    each method's regret once it has spent what random search spends on `budget` trials (median over
    seeds), which is fair to a method that stops trials and could run more of them. With `ref`, a column of
    each method's regret minus ref's, seed by seed (sim.paired_interval), at the budget and at equal
    compute: what decides between two settings. Last, the same figures for `--json`, by method."""
    rows, to_target, never, paired, figures = [], {}, {}, {}, {}
    base = res[res.method == "random"].compute.median() if "random" in set(res.method) else math.nan
    # Compute to within 1 point is censored at one cap for every method: the least compute any search of this
    # setting ran to. (Capping each search at what it spent itself favoured methods that spend less per
    # trial: a seed that never got there counted with a smaller total.)
    cap = min(float(x.events[-1, 0]) for x in res.itertuples())
    for name in methods:
        r = res[res.method == name].sort_values("seed")  # seed by seed beside `ref`
        at_eq = np.array([100 * sim.Run(x.events).regret_at(np.array([base]))[0] for x in r.itertuples()])
        reg, eq = sim.iqm_interval(100 * r.regret.to_numpy()), sim.iqm_interval(at_eq)
        paired[name] = (r.seed.to_numpy(), 100 * r.regret.to_numpy(), at_eq)
        reached = np.array([sim.Run(x.events).compute_to(TARGET) for x in r.itertuples()])
        to_target[name] = np.minimum(reached, cap)
        tt = sim.iqm_interval(to_target[name])
        never[name] = censored = int(np.sum(reached > cap))
        within = float(np.mean(r.regret <= TARGET + 1e-12))
        figures[name] = {"seeds": [int(x) for x in r.seed], "regret": _triple(reg), "regret_at_random_compute":
                         _triple(eq), "seeds_within_1_point": within, "compute_median": float(r.compute.median()),
                         "stopped": float(r.stopped.mean()), "compute_to_1_point": _triple(tt),
                         "seeds_not_within_1_point_by_cap": censored}
        rows.append([name, label(name) if label else sim.METHODS[name].label(), _pts(reg), _pts(eq), f"{within:.0%}",
                     f"{r.compute.median():,.0f}" + (f" ({r.compute.median() / base:.2f})" if base == base else ""),
                     f"{r.stopped.mean():.0%}", _fmt_interval(tt), f"{censored}/{len(r)}"])
    head = ["method", "scheduler / searcher", f"regret at {budget} trials, points (IQM [95%])",
            "regret at random's compute (IQM [95%])", "seeds within 1 point", "trial-s spent (median; of random's)",
            "trials stopped", f"trial-s to within 1 point, capped at {cap:,.0f} (IQM [95%])",
            "seeds not within 1 point by the cap"]
    if ref in paired:
        seeds, at_budget, at_eq = paired[ref]
        head.insert(4, f"minus {ref}, same seeds: at {budget} trials / at random's compute (mean [95%])")
        for row, name in zip(rows, methods):
            same = np.array_equal(paired[name][0], seeds)
            if name == ref or not same:
                row.insert(4, "")
                continue
            pb, pe = sim.paired_interval(paired[name][1], at_budget), sim.paired_interval(paired[name][2], at_eq)
            row.insert(4, f"{_pts(pb)} / {_pts(pe)}")
            figures[name][f"minus_{ref}"] = {"at_budget": _triple(pb, "mean"), "at_random_compute": _triple(pe, "mean"),
                                             "seeds": [int(x) for x in seeds]}
    return table(head, rows), to_target, cap, never, figures


def paired_table(res: pd.DataFrame, methods: list[str], budget: int, ref: str) -> tuple[str, dict]:
    """Each method's regret minus `ref`'s, seed by seed, at the budget and at random's compute (`--against`):
    a prior against the same search without one, a wrong prior against none. Last, the figures for `--json`."""
    base = res[res.method == "random"].compute.median() if "random" in set(res.method) else math.inf

    def by_seed(name):
        r = res[res.method == name].sort_values("seed")
        return r.seed.to_numpy(), 100 * r.regret.to_numpy(), \
            np.array([100 * sim.Run(x.events).regret_at(np.array([base]))[0] for x in r.itertuples()])

    seeds, at_budget, at_eq = by_seed(ref)
    rows, figures = [], {}
    for name in methods:
        s, b, e = by_seed(name)
        if name == ref or not np.array_equal(s, seeds):
            continue
        pb, pe = sim.paired_interval(b, at_budget), sim.paired_interval(e, at_eq)
        wins = float(np.mean(b < at_budget - 1e-9)), float(np.mean(b > at_budget + 1e-9))
        rows.append([name, _pts(pb), _pts(pe), f"{wins[0]:.0%} / {wins[1]:.0%}"])
        figures[name] = {"at_budget": _triple(pb, "mean"), "at_random_compute": _triple(pe, "mean"),
                         "seeds": [int(x) for x in seeds]}
    return table(["method", f"minus {ref}, same seeds: at {budget} trials (mean [95%], points)",
                  "at random's compute (mean [95%])", f"seeds better / worse than {ref} at {budget} trials"],
                 rows), figures


def _triple(v: tuple[float, float, float], centre: str = "iqm") -> dict:
    """A (value, low, high) figure as JSON: infinite (never) as null."""
    return {k: (float(x) if math.isfinite(x) else None) for k, x in zip((centre, "low", "high"), v)}


def _pts(v: tuple[float, float, float]) -> str:
    return "never" if not math.isfinite(v[0]) else f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def confirm_table(res: pd.DataFrame) -> str:
    """What each confirmed candidate and each seed buys: the chance of picking the best config the search
    ran, the regret after confirmation, and the cost against the search's."""
    rows = []
    for tc in CONFIRMS:
        c = pd.DataFrame([r[tc] for r in res.confirm])
        reg = sim.iqm_interval(100 * c.regret.to_numpy())
        p = float(c.picked_best.mean())
        lo, hi = _wilson(int(c.picked_best.sum()), len(c))
        rows.append([tc[0] or "none", tc[1] or "-", (tc[0] + 1) * tc[1] if tc[0] else 0,
                     f"{p:.0%} [{lo:.0%}, {hi:.0%}]", f"{100 * c.regret.mean():.2f}", _pts(reg),
                     f"{c.share.median():.2f}"])
    return table(["confirm_top", "confirm_seeds", "runs (with the baseline's)", "picks the search's best config "
                  "(95%)", "regret, points (mean)", "regret (IQM [95%])", "cost / search's (median)"], rows)


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def validation_text(res: pd.DataFrame, real: pd.DataFrame) -> str:
    """Each real search's chosen config's val/ accuracy beside the simulated distribution of the same."""
    sims = res.chosen_val.dropna().to_numpy()
    q = np.percentile(sims, [5, 25, 50, 75, 95])
    rows = [[f"seed {int(r.seed)}", r.trial_id, f"{r.val_accuracy:.4f}", f"{r.val_tta:.4f}",
             f"{r.holdout_accuracy:.4f}", f"{np.mean(sims <= r.val_accuracy):.0%}", f"{r.trial_cpu_s:,.0f}",
             f"{int(r.stopped)}/{int(r.trials)}"] for r in real.itertuples()]
    sim_row = ["simulated", f"{len(sims)} seeds", f"{np.mean(sims):.4f} (5-95%: {q[0]:.4f}-{q[4]:.4f})", "",
               "", f"median {q[2]:.4f}", f"{res.compute.median():,.0f} (median)", f"{res.stopped.mean():.0%}"]
    return table(["search", "chosen trial", "val/ accuracy of its final model", "with TTA", "holdout",
                  "share of simulated searches at or below", "trial-s (CPU)", "stopped"], [*rows, sim_row])


def _num(x: float, fmt: str = ",.0f") -> str:
    return "never" if not math.isfinite(x) else format(x, fmt)


def _fmt_interval(v: tuple[float, float, float]) -> str:
    return f"{_num(v[0])} [{_num(v[1])}, {_num(v[2])}]"


def anytime_figure(res: pd.DataFrame, methods: list[str], title: str, path: Path) -> None:
    """IQM regret of the current choice over trial-seconds, with bootstrap 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = np.nanmedian([r.events[-1, 0] for r in res[res.method == "random"].itertuples()] or
                       [r.events[-1, 0] for r in res.itertuples()])
    grid = np.linspace(0, top, GRID)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(methods):
        curves = np.array([100 * sim.Run(r.events).regret_at(grid) for r in res[res.method == name].itertuples()])
        mid = np.array([sim.iqm(c) for c in curves.T])
        band = np.array([sim.iqm_interval(c, reps=500)[1:] for c in curves.T])
        ok = np.isfinite(mid)
        line, = ax.plot(grid[ok], mid[ok], label=name, ls=("-", "--", "-.", ":")[i % 4])  # equal curves stay visible
        both = ok & np.all(np.isfinite(band), axis=1)
        ax.fill_between(grid[both], band[both, 0], band[both, 1], color=line.get_color(), alpha=0.15)
    ax.axhline(100 * TARGET, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("simulated compute (trial-seconds)")
    ax.set_ylabel("regret of the current choice (points, IQM)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rung_table(res: pd.DataFrame, shares: list[float]) -> str:
    """How often a single rung at each share cuts the trial FIFO would choose, and what it costs."""
    fifo = {r.seed: r for r in res[res.method == "fifo"].itertuples()}
    rows = []
    for share, final in [(sh, f) for sh in shares for f in (False, True)]:
        cut, cost, saved = [], [], []
        for r in res[res.method == f"rung {share:.2f}" + (" final" if final else "")].itertuples():
            f = fifo[r.seed]
            done = [t for t in f.trials]
            best = max(done, key=lambda t: t["final"])  # FIFO's choice: the best final holdout accuracy
            mine = next(t for t in r.trials if t["n"] == best["n"])
            cut.append(mine["stopped"])
            cost.append(100 * (r.regret - f.regret))
            saved.append(1 - r.compute / f.compute)
        c = sim.iqm_interval(cost) if cost else (math.nan,) * 3
        if not cut:
            continue
        rows.append([f"{share:.0%}" + (", at the final size" if final else ""), f"{np.mean(cut):.0%}",
                     f"{np.mean(cost):+.2f} (IQM {c[0]:+.2f} [{c[1]:+.2f}, {c[2]:+.2f}])", f"{np.mean(saved):.0%}"])
    return table(["rung at share of schedule", "FIFO's choice cut", "regret cost, points (mean; IQM [95%])",
                  "compute saved"], rows)


GP = "GP sampler (on to 1.5x)"
SWEEP = {  # the defaults' candidates (--sweep): one knob moved at a time from the shipped method
    "shipped": sim.METHODS["tune_sota"],
    "before issue 16: rung 50%": sim.Method("tpe", "asha", grace=0.5, final_size=False),
    "no early stopping": sim.Method("tpe", "fifo"),
    "rung 75%, not waiting for the final size": sim.Method("tpe", "asha", final_size=False),
    "rung 50% at the final size": sim.Method("tpe", "asha", grace=0.5),
    "rungs 50%, 75% at the final size": sim.Method("tpe", "rungs", shares=(0.5, 0.75)),
    "grace 0.25 (rungs 25%, 50%)": sim.Method("tpe", "asha", grace=0.25),
    "rf 3, grace 0.33 (rung 33%)": sim.Method("tpe", "asha", grace=0.33, rf=3),
    "2 start-up trials": sim.Method("tpe", "asha", startup=2),
    "8 start-up trials": sim.Method("tpe", "asha", startup=8),
    "random sampler": sim.Method("random", "asha"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="searcher seeds per method and setting (default 20)")
    ap.add_argument("--first-seed", type=int, default=0, help="the first searcher seed (default 0)")
    ap.add_argument("--table", default=str(BENCH / "curves" / "curves.csv.gz"),
                    help="the recorded table (default bench/curves/curves.csv.gz; the second task's is "
                         "bench/curves-quarter/curves.csv.gz)")
    ap.add_argument("--space", help="the table's space (default: space.yaml beside the table)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON: per setting and method the "
                    "regret's IQM and interval, the paired difference against random with its seeds, the ratio line")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="simulate on a made-up table of N configs instead (a dry run; figures mean nothing)")
    ap.add_argument("--settings", default="12x2,32x4", help="trials x workers, comma-separated (default 12x2,32x4)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"of {', '.join(sim.METHODS)} (default {DEFAULT_METHODS}; gp+asha is slow)")
    ap.add_argument("--extend", type=float, default=EXTEND,
                    help=f"the first setting's searches run on to this many times the compute of their trials "
                         f"(that many random trials' mean trial-seconds), for the compute to within 1 point "
                         f"(default {EXTEND:g}); the others to at most {SWEEP_EXTEND:g}x")
    ap.add_argument("--rungs", default="0.25,0.33,0.5,0.75", help="rung shares to analyse ('' for none)")
    ap.add_argument("--sweep", action="store_true",
                    help="also replay the candidates for the defaults (grace, rf, rung placement, start-up trials, "
                         "sampler), one knob at a time")
    ap.add_argument("--validation", default=str(BENCH / "curves" / "validation.csv"),
                    help="real searches' chosen val/ accuracies (bench/validate_sim.py) to put beside the simulated")
    ap.add_argument("--budget-only", action="store_true",
                    help="run each search only to its trial budget (no run-on; the compute columns and the ratio "
                         "line then say little): the regret at the budget, seed by seed, in a fraction of the time")
    ap.add_argument("--against", default="", help="also compare each method seed by seed with these (comma-separated "
                    "methods, e.g. tune_sota: the same search without priors), in a table of their own")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--out", default=str(BENCH / "curves" / "sim"), help="where the figures go")
    ap.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    if args.synthetic:
        space, frame = sim.synthetic_space(), sim.synthetic_table(args.synthetic, seed=args.first_seed)
        source = f"a synthetic table of {args.synthetic} configs (tune_sota.simulator.synthetic_table): a dry run"
    else:
        if not Path(args.table).is_file():
            sys.exit(f"simulate.py: no table at {args.table}; record one with bench/record_curves.py, or give "
                     f"--synthetic N for a dry run on a made-up table")
        try:  # the loader tests/test_simulator.py checks the committed table with
            space, frame = sim.load_table(args.table, args.space)
        except UserError as e:
            sys.exit(f"simulate.py: {e}")
        where = Path(args.table).resolve()
        source = str(where.relative_to(BENCH.parent) if where.is_relative_to(BENCH.parent) else where)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in sim.METHODS]
    if unknown:
        sys.exit(f"simulate.py: unknown method {', '.join(unknown)}; use {', '.join(sim.METHODS)}")
    try:
        settings = parse_settings(args.settings)
    except ValueError:
        sys.exit(f"simulate.py: --settings {args.settings!r} is not TRIALSxWORKERS[,...], e.g. 12x2,32x4")
    trials_n = frame.drop_duplicates("trial_id")
    n_rep = int((trials_n.replicate_of.fillna("") != "").sum()) if "replicate_of" in trials_n else 0
    global MODEL
    MODEL = sim.Surrogate(frame, space, seed=0)
    wrong = [sim.METHODS[m] for m in methods if sim.METHODS[m].wrong]
    for m in wrong:  # computed once, before the workers fork
        sim.worst_corner(MODEL, sim.method_space(MODEL, m)[1])
    rho, n_held = sim.heldout_spearman(frame, space)
    noise = MODEL.noise
    lines = [f"- table: {source}; {len(trials_n) - n_rep} trials and {n_rep} seed replicates, {len(frame)} epoch "
             f"rows; searched: {', '.join(space.searched)}",
             f"- surrogate: random forests (tune_sota/simulator.py); Spearman of predicted and recorded val/ "
             f"accuracy on held-out configs (5-fold): {rho:.2f} over {n_held} configs; noise from "
             f"{noise.get('pairs', 0)} replicate pairs: seed offset {noise['seed']:.4f}, epoch jitter by thirds of the "
             f"schedule {'/'.join(f'{x:.4f}' for x in noise.get('epoch_thirds', [noise['epoch']] * 3))}, val/ "
             f"{noise['val']:.4f}; val/ = the curve's end + {MODEL.offset:+.4f}; best predicted val/ accuracy in "
             f"the space {MODEL.best:.4f}",
             f"- {args.seeds} searcher seeds from {args.first_seed} per method and setting; " + (
                 "each search runs to its trial budget only (--budget-only: the compute columns and the ratio line "
                 "say little)" if args.budget_only else f"the first setting's searches run on to {args.extend:g}x the "
                 f"compute of their trials, the others' to {min(args.extend, SWEEP_EXTEND):g}x") +
             f" (one trial: {MODEL.trial_seconds:,.0f} trial-seconds, the mean of a random proposal run to its "
             f"end); compute is simulated trial-seconds (the table's CPU "
             f"seconds per epoch); "
             f"regret is in points of val/ accuracy below the best in the space"]
    if wrong:
        from tune_sota.priors import pick

        picks = pick(space.searched)
        held = sim.method_space(MODEL, wrong[0])[1]
        corner = sim.worst_corner(MODEL, held)
        wc = {k: corner[k] for k in (picks or corner) if k not in held}
        value = MODEL.values([{**MODEL.baseline(), **picks, **held}])[0]
        lines.append(f"- priors (the space's): {picks}, predicted val/ accuracy of the pick "
                     f"{value:.4f}{f' with {held} held' if held else ''}; the wrong priors ('-wrong' methods): the "
                     f"worst corner of the space{' among the searched keys' if held else ''}, {wc}, "
                     f"predicted {MODEL.values([corner])[0]:.4f}, at the same confidences")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    # the ratio's setting (the first) runs on to --extend x its compute; the others only as far as equal
    # compute needs (a 32-trial TPE search run on to 8x takes seconds per proposal late on)
    def job(kind: str, setting: str, name: str, method: sim.Method, seed: int, n: int, w: int,
            times: float | None = None) -> tuple:
        """A search of n trials on w workers; with `times`, run on to that many times n trials' compute."""
        if times is None:
            return kind, setting, name, method, seed, n, w, n, math.inf
        return (kind, setting, name, method, seed, int(math.ceil(n * times * MORE_TRIALS)), w, n,
                n * times * MODEL.trial_seconds)

    jobs = [job("method", f"{n}x{w}", name, sim.METHODS[name], s, n, w,
                None if args.budget_only else args.extend if i == 0 else min(args.extend, SWEEP_EXTEND))
            for i, (n, w) in enumerate(settings) for name in methods for s in seeds]
    shares = [float(v) for v in args.rungs.split(",") if v.strip()]
    n0, w0 = settings[0]
    if shares:
        jobs += [job("rung", f"{n0}x{w0}", "fifo", sim.Method("random", "fifo"), s, n0, w0) for s in seeds]
        jobs += [job("rung", f"{n0}x{w0}", f"rung {sh:.2f}{' final' * final}",
                     sim.Method("random", "rungs", shares=(sh,), final_size=final), s, n0, w0)
                 for final in (False, True) for sh in shares for s in seeds]
    real = pd.read_csv(args.validation, dtype={"resize": str}) if Path(args.validation).is_file() \
        and not args.synthetic else pd.DataFrame()
    groups = []  # real searches of one budget and one set of decision settings each
    if len(real):  # rows before issue 26 searched epochs (no epochs_mode column)
        real["epochs_mode"] = real["epochs_mode"].fillna("searched") if "epochs_mode" in real else "searched"
    keys = ["searches", "scheduler", "grace", "reduction_factor", "searcher", "startup_trials", "final_size",
            "epochs_mode"]
    for _, group in (real.groupby(keys, sort=False) if len(real) else []):
        g = group.iloc[0]
        n, w = parse_settings(g.searches)[0]
        method = sim.Method(g.searcher, g.scheduler, grace=float(g.grace), rf=int(g.reduction_factor),
                            startup=int(g.startup_trials), final_size=bool(g.final_size), epochs=g.epochs_mode)
        tag = f"{g.searches} {method.label()}"
        groups.append((tag, g.searches, method, group))
        jobs += [job("valid", tag, "tune_sota", method, s, n, w) for s in seeds]
    if args.sweep:
        jobs += [job("sweep", f"{n}x{w}", name, m, s, n, w, SWEEP_EXTEND)
                 for n, w in settings for name, m in {"random": sim.METHODS["random"], **SWEEP}.items() for s in seeds]
        # Optuna's GPSampler takes seconds per proposal (without greenlet, its L-BFGS-B runs one start at a
        # time): it is replayed at the first setting only, on to a little past random's compute there
        jobs += [job("sweep", f"{n0}x{w0}", GP, sim.METHODS["gp+asha"], s, n0, w0, 1.5) for s in seeds]
    ctx = multiprocessing.get_context("fork")  # the workers share the fitted surrogate
    with ctx.Pool(args.processes) as pool:
        res = pd.DataFrame(pool.map(_job, jobs, chunksize=4))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    body, ratio = ["\n".join(lines)], None
    figures = {"table": source, "surrogate_heldout_spearman": float(rho), "heldout_configs": int(n_held),
               "seeds": list(seeds), "settings": {}, "ratio": None}
    for n, w in settings:
        r = res[(res.kind == "method") & (res.setting == f"{n}x{w}")]
        text, to_target, cap, never, by_method = method_table(r, methods, n, ref="random")
        figures["settings"][f"{n}x{w}"] = {"methods": by_method}
        for ref in [a.strip() for a in args.against.split(",") if a.strip() in methods]:
            extra, by_ref = paired_table(r, methods, n, ref)
            text += f"\n\nSeed by seed against {ref} ({n} trials, {w} workers):\n\n{extra}"
            for name, f in by_ref.items():
                by_method[name][f"minus_{ref}"] = f
        fig = out / f"anytime_{n}x{w}.png"
        anytime_figure(r, methods, f"{n} trials, {w} workers: IQM regret over {args.seeds} seeds, 95% bands", fig)
        shown = fig.relative_to(BENCH.parent) if fig.is_relative_to(BENCH.parent) else fig
        body.append(f"**{n} trials, {w} workers** (figure: {shown})\n\n{text}")
        if ratio is None and "tune_sota" in to_target and "random" in to_target and not args.budget_only:
            ratio = (n, w, sim.ratio_interval(to_target["tune_sota"], to_target["random"]))
            censored = never
            ratio_cap = cap
            two = {m: np.array([sim.Run(x.events).compute_to(2 * TARGET) for x in r[r.method == m].itertuples()])
                   for m in ("tune_sota", "random")}
            ratio2 = (sim.ratio_interval(np.minimum(two["tune_sota"], cap), np.minimum(two["random"], cap)),
                      {m: int(np.sum(two[m] > cap)) for m in two})
        if "tune_sota" in methods:
            body.append(f"**Confirmation after {n} trials, {w} workers** (tune_sota's searches above; each confirmed "
                        f"run's val/ accuracy is its config's plus a seed's noise; 'the search's best config': the "
                        f"best by true val/ accuracy among its completed trials)\n\n"
                        + confirm_table(r[r.method == "tune_sota"]))
    if args.sweep:
        for n, w in settings:
            r = res[(res.kind == "sweep") & (res.setting == f"{n}x{w}")]
            names = ["random", *SWEEP, *([GP] if (n, w) == (n0, w0) else [])]
            text, *_, by_method = method_table(r, names, n, label=lambda m: (SWEEP.get(m) or sim.METHODS[m if m != GP
                                                                                         else "gp+asha"]).label(),
                                    ref="shipped")
            figures["settings"].setdefault(f"{n}x{w}", {})["sweep"] = by_method
            body.append(f"**Defaults, {n} trials, {w} workers** (one knob moved at a time from the shipped method; "
                        f"runs on to {SWEEP_EXTEND:g}x the trials' compute)\n\n{text}")
    if shares:
        rr = res[res.kind == "rung"]
        body.append(f"**Rungs** ({n0} trials, {w0} workers, random proposals; one ScheduleASHA rung, rf 2; "
                    f"'final': a trial still at a smaller size of progressive resizing waits for its first epoch "
                    f"at the final size; 'FIFO's choice': the trial with the best final holdout accuracy had none "
                    f"been cut)\n\n" + rung_table(rr, shares))
    for tag, searches, method, group in groups:
        r = res[(res.kind == "valid") & (res.setting == tag)]
        body.append(f"**Validation against real searches** ({searches}, {method.label()}: {len(group)} real "
                    f"search(es) by bench/validate_sim.py of the same space with these settings; the chosen trial's "
                    f"final model scored on val/, beside the simulated val/ accuracy of the choice, the surrogate's "
                    f"plus a seed's noise)\n\n" + validation_text(r, group))
    body.append(f"- simulated {len(jobs)} searches in {time.perf_counter() - t0:.0f} s ({args.processes} processes)")
    if ratio is not None:
        n, w, (pt, lo, hi) = ratio
        body.append(f"- the ratio below: IQM over seeds of the trial-seconds until the choice came within 1 point, "
                    f"tune_sota's over random's, at {n} trials and {w} workers (bootstrap 95% interval); a seed "
                    f"that had not come within 1 point by {ratio_cap:,.0f} trial-seconds (the least any search of "
                    f"the setting ran to, on to {args.extend:g}x its trials' compute) counts as that: "
                    f"{censored['tune_sota']} such seed(s) of tune_sota, {censored['random']} of random; where "
                    f"most seeds are censored the ratio says little")
        (p2, l2, h2), cens2 = ratio2
        body.append(f"- within 2 points, the same way: tune_sota {_num(p2, '.2f')} [{_num(l2, '.2f')}, "
                    f"{_num(h2, '.2f')}] of random's ({cens2['tune_sota']} and {cens2['random']} seeds never "
                    f"within 2 points)")
        figures["ratio"] = {"setting": f"{n}x{w}", "value": _triple((pt, lo, hi))["iqm"],
                            "low": _triple((pt, lo, hi))["low"], "high": _triple((pt, lo, hi))["high"],
                            "censored": {k: int(v) for k, v in censored.items() if k in ("tune_sota", "random")}}
        pt, lo, hi = (_num(v, ".2f") for v in (pt, lo, hi))
        body.append(f"compute to within 1 point: tune_sota {pt} [{lo}, {hi}] of random's")
    text = "\n\n".join(body)
    print(text)
    if args.record:
        record("simulate: what the search is worth, replayed on recorded curves", text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
