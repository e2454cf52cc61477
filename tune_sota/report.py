"""The report of a search: `results/NAME/report.html`, one page that opens offline from `file://`
(plotly's JavaScript is inlined, nothing is fetched), and PNG copies of its charts in
`results/NAME/figures/` drawn with matplotlib, so no browser is needed to make them.

It reads only what a results folder holds: `trials.csv`, `history.csv`, `best.yaml`, `run.yaml`,
`space.yaml`, and when present the Optuna study (`study.db`, or `search.storage`) and the
confirmation runs (`confirm.csv`). A folder written before any of those existed still gets a report:
each section says what it is built from, and what is missing.
"""

from __future__ import annotations

import html
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from tune_sota import results
from tune_sota.config import UserError, write_atomic

log = logging.getLogger(__name__)

STATUS_COLORS = {
    "completed": "#1f77b4", "stopped": "#ff7f0e", "diverged": "#d62728", "error": "#7f7f7f",
    "unfinished": "#9467bd", "interrupted": "#8c564b",
}
CHARTS = ("confirm", "best_so_far", "curves", "parallel", "importance", "cost")  # in page order
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
# A page that reads at a thousand trials: past these counts the curves show the best trials as lines and the
# rest as bands, the parallel coordinates colour only the best share, and the table lists the best rows (the
# whole table is trials.csv).
CURVE_LINES = 20  # learning curves drawn one by one; more trials than this: the best ones, the others as bands
TABLE_ROWS = 100  # rows of the page's trial table
PARALLEL_COLOURED = 0.1  # share of the trials coloured in the parallel coordinates once there are > TABLE_ROWS
IDS_NAMED = 20  # trial ids a sentence names before it says "and N more"


@dataclass
class Search:
    """Everything a results folder holds about one search, read defensively (old folders lack parts)."""

    dir: Path
    name: str
    run: dict
    space: dict
    result: dict  # best.yaml's `result:` block
    best_values: dict  # best.yaml's config values
    trials: pd.DataFrame
    history: pd.DataFrame
    searched: list[str]
    confirm: pd.DataFrame | None = None
    study: object | None = None  # optuna.Study
    notes: dict[str, str] = field(default_factory=dict)
    importances: tuple | None = field(default=None, repr=False)  # importance()'s answer, once per report

    @property
    def metric(self) -> str:
        """What the trials' accuracy was measured on, for axis titles."""
        on = self.result.get("select_on") or ((self.space.get("search") or {}).get("select_on"))
        return {"holdout": "accuracy on the holdout", "val": "accuracy on val/"}.get(on, "accuracy")


def _yaml(path: Path) -> dict:
    try:
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    except yaml.YAMLError:
        return {}


def study_url(results_dir: Path, space: dict | None = None) -> str | None:
    """Where the search's Optuna study is: `search.storage` of its space, else `study.db` if it exists."""
    space = space if space is not None else _yaml(Path(results_dir) / "space.yaml")
    storage = ((space or {}).get("search") or {}).get("storage") or ""
    if not storage and not (Path(results_dir) / "study.db").is_file():
        return None  # never let Optuna create an empty one
    return results.study_url(results_dir, storage)


def open_study(results_dir: Path, name: str | None = None):
    """The search's Optuna study, or None when the folder has none (a search from before study.db)."""
    import optuna

    url = study_url(results_dir)
    if url is None:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = optuna.get_all_study_names(storage=url)
    name = name or _yaml(Path(results_dir) / "run.yaml").get("name") or Path(results_dir).name
    if name not in names:
        if len(names) != 1:
            return None
        name = names[0]  # a renamed folder: its one study
    return optuna.load_study(study_name=name, storage=url)


def load(results_dir) -> Search:
    """Read a results folder for the report; raises UserError when it is not one."""
    p = Path(results_dir)
    if not p.is_dir() or not ((p / "trials.csv").is_file() or (p / "run.yaml").is_file()):
        raise UserError(f"{p} is not a results folder (no trials.csv or run.yaml); give one that `tune-sota search` "
                        f"wrote, e.g. results/quick")
    run, space, best = _yaml(p / "run.yaml"), _yaml(p / "space.yaml"), _yaml(p / "best.yaml")
    trials, history = results.load_trials(p), results.load_history(p)
    searched = [k for k in run.get("searched") or [] if k in trials.columns]
    if not searched:  # an old run.yaml: the space's distributions are what was searched
        searched = [k for k, v in space.items() if isinstance(v, dict) and k != "search" and k in trials.columns]
    s = Search(p, run.get("name") or p.name, run, space, best.get("result") or {},
               {k: v for k, v in best.items() if k != "result"}, trials, history, searched)
    if (p / "confirm.csv").is_file():
        s.confirm = results.load_confirm(p)
    try:
        s.study = open_study(p, s.name)
    except Exception as e:  # a database that is gone or locked must not cost the rest of the report
        s.notes["importance"] = f"The Optuna study could not be opened ({type(e).__name__}: {e})."
    return s


# ---- data shaped for the charts -----------------------------------------------------------------------


def creation_order(s: Search) -> dict[str, int]:
    """Trial id -> the order the searcher created it: the study's trial numbers when there is a study,
    else the order of history.csv (Ray lists trials as it created them)."""
    order = {}
    if s.study is not None:
        for t in s.study.get_trials(deepcopy=False):
            if t.user_attrs.get("ray_trial_id"):
                order[str(t.user_attrs["ray_trial_id"])] = t.number
    for tid in s.history.trial_id.astype(str).drop_duplicates() if len(s.history) else ():
        order.setdefault(tid, len(order) + 10**6)
    return order


def best_so_far(trials: pd.DataFrame, order: dict[str, int] | None = None) -> pd.DataFrame:
    """Per trial in creation order: cumulative trial-seconds, its accuracy, and the best completed so far."""
    rank = trials.trial_id.astype(str).map(order or {}).fillna(10**9) if len(trials) else []
    t = trials.assign(_order=rank).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    t["cum_s"] = t.time_s.fillna(0).cumsum()
    done = t.accuracy.where(t.status == results.COMPLETED)
    t["best"] = done.cummax().ffill()  # cummax leaves a gap at every trial that did not complete
    return t


def best_per_budget(trials: pd.DataFrame) -> pd.DataFrame:
    """The best completed trial for each number of epochs (its training budget)."""
    done = trials[(trials.status == results.COMPLETED) & trials.accuracy.notna()]
    if done.empty:
        return done
    return done.sort_values("accuracy", ascending=False).groupby("epochs_run", sort=True).head(1).sort_values(
        "epochs_run")


def _is_log(space: dict, key: str) -> bool:
    v = space.get(key)
    return isinstance(v, dict) and "loguniform" in v


def _params(row, keys) -> str:
    values = ((k, getattr(row, k)) for k in keys)  # rows from itertuples
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values)


# ---- plotly charts ------------------------------------------------------------------------------------


def _layout(fig, title: str, x: str, y: str, height: int = 420):
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, template="plotly_white",
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.18))
    return fig


def fig_best_so_far(s: Search):
    import plotly.graph_objects as go

    t = best_so_far(s.trials, creation_order(s))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=t.cum_s, y=t.best, mode="lines", line_shape="hv", name="best completed so far",
                             line=dict(color=STATUS_COLORS["completed"], width=3)))
    symbols = {"completed": "circle", "stopped": "x", "diverged": "triangle-down", "error": "triangle-down"}
    for status, g in t.groupby("status", sort=False):
        y = g.accuracy.fillna(0)
        label = "stopped by ASHA" if status == results.STOPPED else status
        fig.add_trace(go.Scatter(
            x=g.cum_s, y=y, mode="markers", name=label,
            marker=dict(color=STATUS_COLORS.get(status, "#333"), symbol=symbols.get(status, "circle"),
                        size=10 if len(t) <= TABLE_ROWS else 5),  # a thousand large markers are one blot
            text=[f"{r.trial_id}<br>{_params(r, s.searched)}<br>{r.epochs_run}/{r.epochs} epochs"
                  for r in g.itertuples()],
            hovertemplate="%{text}<br>accuracy %{y:.4f}<extra>" + label + "</extra>"))
    return _layout(fig, "Best accuracy so far against trial-time spent", "cumulative trial-seconds (trials in "
                   "creation order)", s.metric)


def curve_plan(s: Search) -> tuple[list[str], pd.DataFrame]:
    """(trial ids whose curves are drawn as lines, bands of the others): every trial while there are at most
    CURVE_LINES; else the CURVE_LINES best (trials.csv is best first), and for the rest, per status and epoch,
    the 10th, 50th and 90th percentile of the accuracy and how many trials reached that epoch."""
    ids = list(dict.fromkeys(s.history.trial_id.astype(str)))
    if len(ids) <= CURVE_LINES:
        return ids, pd.DataFrame(columns=["status", "epoch", "low", "median", "high", "n"])
    with_history = set(ids)
    lines = [t for t in s.trials.trial_id.astype(str) if t in with_history][:CURVE_LINES]
    status = dict(zip(s.trials.trial_id.astype(str), s.trials.status))
    rest = s.history[~s.history.trial_id.astype(str).isin(lines)].dropna(subset=["accuracy"])
    rest = rest.assign(status=rest.trial_id.astype(str).map(status).fillna(results.UNFINISHED))
    g = rest.groupby(["status", "epoch"]).accuracy
    bands = pd.DataFrame({"low": g.quantile(0.1), "median": g.median(), "high": g.quantile(0.9),
                          "n": g.size()}).reset_index()
    return lines, bands


def _status_label(st: str) -> str:
    return "stopped by ASHA" if st == results.STOPPED else st


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def fig_curves(s: Search):
    import plotly.graph_objects as go

    status = dict(zip(s.trials.trial_id.astype(str), s.trials.status))
    lines, bands = curve_plan(s)
    fig, shown = go.Figure(), set()
    for st, b in bands.groupby("status", sort=False):
        colour, label = STATUS_COLORS.get(st, "#333333"), _status_label(st)
        b = b.sort_values("epoch")
        fig.add_trace(go.Scatter(x=b.epoch, y=b.high, mode="lines", line=dict(width=0), legendgroup=f"band-{st}",
                                 showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=b.epoch, y=b.low, mode="lines", line=dict(width=0), fill="tonexty", fillcolor=_rgba(colour, 0.18),
            legendgroup=f"band-{st}", name=f"{label}: the other trials, 10th-90th percentile", hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=b.epoch, y=b["median"], mode="lines", line=dict(color=colour, width=1.5, dash="dash"),
            legendgroup=f"band-{st}", name=f"{label}: their median", customdata=b.n,
            hovertemplate=f"{label}, epoch %{{x}}: median %{{y:.4f}} of %{{customdata}} trials<extra></extra>"))
    history = s.history[s.history.trial_id.astype(str).isin(lines)].sort_values("epoch")
    for tid, g in history.groupby(history.trial_id.astype(str), sort=False):
        st = status.get(tid, "unfinished")
        fig.add_trace(go.Scatter(
            x=g.epoch, y=g.accuracy, mode="lines+markers", legendgroup=st, showlegend=st not in shown,
            name=_status_label(st) if bands.empty else f"{_status_label(st)} (one of the best {len(lines)})",
            line=dict(color=STATUS_COLORS.get(st, "#333"), width=1.5), marker=dict(size=5),
            hovertemplate=f"{tid} ({st})<br>epoch %{{x}}: accuracy %{{y:.4f}}<extra></extra>"))
        shown.add(st)
    title = ("Every trial's learning curve (accuracy after each epoch)" if bands.empty else
             f"The best {len(lines)} trials' learning curves; the other {s.history.trial_id.nunique() - len(lines)} "
             f"as bands per status")
    return _layout(fig, title, "epoch", s.metric)


def fig_parallel(s: Search):
    import numpy as np
    import plotly.graph_objects as go

    t = s.trials[s.trials.accuracy.notna()].sort_values("accuracy", kind="stable")  # the best drawn last, on top
    many = len(t) > TABLE_ROWS
    dims = []
    for k in s.searched:
        col = t[k]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            if _is_log(s.space, k):
                values = np.log10(col.astype(float))
                ticks = np.linspace(values.min(), values.max(), 4) if len(values) else []
                dims.append(dict(label=f"{k} (log)", values=values, tickvals=list(ticks),
                                 ticktext=[f"{10 ** v:.2g}" for v in ticks]))
            else:
                dims.append(dict(label=k, values=col.astype(float)))
        else:
            cats = sorted(col.astype(str).unique())
            dims.append(dict(label=k, values=col.astype(str).map(cats.index), tickvals=list(range(len(cats))),
                             ticktext=cats))
    statuses = sorted(t.status.unique())
    dims.append(dict(label="status", values=t.status.map(statuses.index), tickvals=list(range(len(statuses))),
                     ticktext=statuses))
    dims.append(dict(label="accuracy", values=t.accuracy))
    line = dict(color=t.accuracy, colorscale="Viridis", showscale=True, colorbar=dict(title="accuracy"))
    title = "Searched values of every trial, coloured by accuracy (drag on an axis to filter)"
    if many:  # a thousand coloured lines are a blur: the best share in colour over the others in light grey
        import plotly.colors

        cut = float(t.accuracy.quantile(1 - PARALLEL_COLOURED))
        viridis = plotly.colors.sequential.Viridis
        scale = [[0.0, "#dddddd"], [1e-6, viridis[0]]] + [
            [i / (len(viridis) - 1), c] for i, c in enumerate(viridis) if i]
        line.update(colorscale=scale, cmin=cut - 1e-9, cmax=float(t.accuracy.max()))
        title = (f"Searched values of all {len(t)} trials; the best {PARALLEL_COLOURED:.0%} (accuracy >= {cut:.4f}) "
                 f"coloured, the others grey (drag on an axis to filter)")
    fig = go.Figure(go.Parcoords(line=line, dimensions=dims))
    fig.update_layout(title=title, height=460, margin=dict(l=70, r=40, t=110, b=30), template="plotly_white")
    return fig


def importance(s: Search) -> tuple[object | None, str]:
    """Optuna's parameter importances on the stored study, and a sentence saying which trials they use.
    Computed once per `Search` (fANOVA fits a forest): the page and the PNGs share it."""
    if s.importances is None:
        s.importances = _importance(s)
    return s.importances


def _importance(s: Search) -> tuple[object | None, str]:
    import optuna
    from optuna.importance import (
        FanovaImportanceEvaluator,
        MeanDecreaseImpurityImportanceEvaluator,
        PedAnovaImportanceEvaluator,
    )
    from optuna.trial import TrialState

    if s.study is None:
        return None, s.notes.get("importance") or (
            "No Optuna study in this folder (searches before study.db kept only optuna.csv), so no importances.")
    trials = s.study.get_trials(deepcopy=False)
    states = pd.Series([t.state.name for t in trials]).value_counts().to_dict()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ids = [t.user_attrs.get("ray_trial_id") or f"#{t.number}" for t in complete]
    left_out = ", ".join(f"{n} {st}" for st, n in states.items() if st != "COMPLETE") or "none"
    named = ", ".join(ids[:IDS_NAMED]) + (f" and {len(ids) - IDS_NAMED} more" if len(ids) > IDS_NAMED else "")
    which = (f"Computed by Optuna's evaluators on the study's {len(complete)} COMPLETE trials "
             f"({named or 'none'}); left out: {left_out} (a pruned trial's accuracy is a partial-budget "
             f"one). With this few trials, read them as a hint, not a measurement.")
    if len(complete) < 2:
        return None, f"Not enough complete trials for importances: {len(complete)} (need 2). " + which
    import plotly.graph_objects as go

    fig = go.Figure()
    evaluators = {"fANOVA": FanovaImportanceEvaluator(seed=0),
                  "mean decrease impurity": MeanDecreaseImpurityImportanceEvaluator(seed=0),
                  "PED-ANOVA": PedAnovaImportanceEvaluator()}
    failed, said = [], []
    for label, evaluator in evaluators.items():
        try:
            # an evaluator's caveat (PED-ANOVA: "importances will be equal") belongs in the sentence under
            # the chart, not on the terminal of `tune-sota report`
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                bar = optuna.visualization.plot_param_importances(s.study, evaluator=evaluator).data[0]
            said += [f"{label}: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
        except Exception as e:  # e.g. PED-ANOVA with too few trials, or every trial alike
            failed.append(f"{label}: {type(e).__name__}")
            continue
        fig.add_trace(go.Bar(x=bar.x, y=bar.y, orientation="h", name=label, text=[f"{v:.2f}" for v in bar.x],
                             hovertemplate=f"{label}<br>%{{y}}: %{{x:.3f}}<extra></extra>"))
    if not fig.data:
        return None, f"Optuna's evaluators could not rank the parameters ({'; '.join(failed)}). " + which
    if failed:
        which += f" Not shown: {'; '.join(failed)}."
    if said:
        which += f" Optuna noted: {' '.join(said)}"
    fig.update_layout(barmode="group")
    return _layout(fig, "Parameter importance (share of the accuracy's variation, per evaluator)",
                   "importance (normalized: sums to 1 per evaluator)", "", height=360), which


def fig_cost(s: Search):
    import plotly.graph_objects as go

    t = s.trials[s.trials.accuracy.notna()]
    fig = go.Figure()
    for status, g in t.groupby("status", sort=False):
        label = "stopped by ASHA" if status == results.STOPPED else status
        fig.add_trace(go.Scatter(
            x=g.time_s, y=g.accuracy, mode="markers", name=label, marker=dict(color=STATUS_COLORS.get(status, "#333"),
                                                                               size=9, opacity=0.7),
            text=[f"{r.trial_id}<br>{_params(r, s.searched)}<br>{r.epochs_run} epochs" for r in g.itertuples()],
            hovertemplate="%{text}<br>%{x:.0f} s: accuracy %{y:.4f}<extra></extra>"))
    best = best_per_budget(s.trials)
    if len(best):
        fig.add_trace(go.Scatter(
            x=best.time_s, y=best.accuracy, mode="markers+text+lines", name="best config per epoch budget",
            line=dict(color="#2ca02c", dash="dot"), marker=dict(symbol="star", size=18, color="#2ca02c"),
            text=[f"{e} ep" for e in best.epochs_run], textposition="top center",
            customdata=[f"{r.trial_id}<br>{_params(r, s.searched)}" for r in best.itertuples()],
            hovertemplate="best at %{text}: %{customdata}<br>%{x:.0f} s, accuracy %{y:.4f}<extra></extra>"))
    return _layout(fig, "Accuracy against training cost; stars: the best completed config for each epoch budget",
                   "trial-seconds", s.metric)


def fig_confirm(s: Search):
    import plotly.graph_objects as go

    c = s.confirm
    fig = go.Figure()
    for key, g in c.groupby(["role", "rank"], sort=False, dropna=False):
        role, rank = key
        label = "baseline" if role == "baseline" else f"candidate {_int(rank)} ({g.trial_id.iloc[0]})"
        for col, symbol in (("accuracy", "circle"), ("tta_accuracy", "diamond")):
            if col in g:
                fig.add_trace(go.Box(
                    y=g[col], name=label, legendgroup=col, boxpoints="all", pointpos=0, jitter=0.3,
                    offsetgroup=col, marker=dict(symbol=symbol), showlegend=False,
                    hovertemplate=f"{label} {'with TTA' if col != 'accuracy' else 'plain'}: %{{y:.4f}}<extra></extra>",
                    line=dict(color="#1f77b4" if col == "accuracy" else "#2ca02c")))
    fig.update_layout(boxmode="group")
    return _layout(fig, "Confirmation runs: each seed's accuracy, plain (blue) and with TTA (green)", "",
                   "accuracy", height=380)


def _int(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return v


# ---- the page -----------------------------------------------------------------------------------------


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _seeds(d: dict) -> str:
    v = d.get("seeds")
    n = len(v) if isinstance(v, list) else v
    text = f"{n} seed{'s' if n != 1 else ''}" if n is not None else "seeds unknown"
    return text + (f", {d['epochs']} epochs" if d.get("epochs") else "")


def answer_html(s: Search) -> str:
    """The answer at the top: the confirmed winner against the baseline, else the best trial."""
    r, t = s.result, s.trials
    cost = r.get("cost") if isinstance(r.get("cost"), dict) else {}
    counts = ", ".join(f"{n} {st}" for st, n in t.status.value_counts().items()) if len(t) else "no trials"
    spent = cost.get("search_trial_s", t.time_s.fillna(0).sum() if len(t) else 0)
    line = f"Search: {len(t)} trials ({counts}), {results.clock(spent)} of trial-time"
    if cost.get("confirm_trial_s"):
        line += f"; confirmation {results.clock(cost['confirm_trial_s'])}"
    if cost.get("wall_s"):
        line += f"; {results.clock(cost['wall_s'])} from start to end"
    paras = [f"<p class='cost'>{html.escape(line)}.</p>"]
    if s.confirm is not None and "error" in s.confirm:
        failed = s.confirm[s.confirm.error.fillna("").astype(str) != ""]
        if len(failed):
            first = str(failed.error.iloc[0]).splitlines()[0][:200]
            paras.append(f"<p class='note'>{len(failed)} of {len(s.confirm)} confirmation runs failed (first: "
                         f"{html.escape(first)}); see confirm.csv.</p>")
    if r.get("note"):
        paras.append(f"<p class='note'>{html.escape(str(r['note']))}</p>")
    if r.get("metric"):  # multi-label: what "accuracy" means on this page (search.multi_label_line)
        text = str(r["metric"])
        paras.insert(0, f"<p class='note'>{html.escape(text[:1].upper() + text[1:])}.</p>")
    noise = r.get("selection_noise")
    if isinstance(noise, dict) and noise.get("statement"):  # uncertainty.selection_line, written by the search
        text = str(noise["statement"])
        paras.append(f"<p class='note'>{html.escape(text[:1].upper() + text[1:])}.</p>")
    if s.searched and s.best_values:
        paras.insert(0, "<p class='config'>" + html.escape("  ".join(
            f"{k}={_fmt(s.best_values.get(k))}" for k in s.searched)) + "</p>")
    judged = {"holdout": " on the holdout (a share of train/)", "val": " on val/"}.get(r.get("select_on"), "")
    w, b = r.get("winner"), r.get("baseline")
    if isinstance(w, dict) and isinstance(b, dict):
        source = f" from trial {html.escape(str(r.get('trial_id') or w.get('trial_id')))}" if (
            r.get("trial_id") or w.get("trial_id")) else ""
        head = [
            f"<p class='big'>Confirmed winner{source}: <b>{_pm(w, 'accuracy')}</b> accuracy on val/, "
            f"{_pm(w, 'tta')} with TTA ({_seeds(w)})</p>",
            f"<p class='big'>Baseline, chapter 7's plain recipe: {_pm(b, 'accuracy')}, {_pm(b, 'tta')} with TTA "
            f"({_seeds(b)})</p>",
            f"<p class='big'>Gain: <b>{_signed(r.get('gain_points'))}</b> points, {_signed(r.get('gain_tta_points'))} "
            "with TTA</p>"]
        if r.get("gain_statement"):  # the gain's 95% interval and verdict (uncertainty.gain_line)
            head.append(f"<p class='big'>Verdict: {html.escape(str(r['gain_statement']))}.</p>")
    elif r.get("accuracy") is not None:
        tta = f", with TTA <b>{r['tta_accuracy']:.4f}</b>" if r.get("tta_accuracy") is not None else ""
        epochs = f" after {r['epochs_run']} epochs" if r.get("epochs_run") else ""
        head = [f"<p class='big'>Best trial {html.escape(str(r.get('trial_id', '?')))}: accuracy "
                f"<b>{r['accuracy']:.4f}</b>{judged}{tta}{epochs}</p>"]
        if not r.get("note"):
            head.append("<p class='note'>One run of one trial, not confirmed over seeds against a baseline: read it "
                        "as a candidate.</p>")
    else:
        head = ["<p class='big'>No trial trained all its epochs, so there is no best config yet.</p>"]
    return "<div class='answer'><h2>The answer</h2>" + "".join(head + paras) + "</div>"


def _pm(d: dict, key: str) -> str:
    """`mean ± std` in percent, as the search's summary prints it."""
    mean, std = d.get(f"{key}_mean"), d.get(f"{key}_std")
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}%"


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.1f}"


def table_html(s: Search) -> str:
    """The trial table: one row per trial (the best TABLE_ROWS of a larger search), its status coloured as in
    the charts."""
    t = s.trials.head(TABLE_ROWS)  # trials.csv is best first
    cols = [c for c in dict.fromkeys(["trial_id", "status", *s.searched, "epochs", "epochs_run", "accuracy",
                                      "best_accuracy", "tta_accuracy", "confirmed_accuracy", "confirmed_tta",
                                      "valid_loss", "time_s", "error"]) if c in t.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for _, row in t.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            text = html.escape(_fmt(v))[:200]
            style = f" style='color:{STATUS_COLORS.get(v, '#333')};font-weight:600'" if c == "status" else ""
            cells.append(f"<td{style}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class='scroll'><table class='trials'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
            "</table></div>")


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1200px;
  padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} .meta code{background:#f4f4f4;padding:1px 4px}
.answer{background:#f3f8ff;border:1px solid #cfe0f7;border-radius:8px;padding:4px 20px 12px}
.answer h2{border:0;margin-top:12px} .big{font-size:18px;margin:6px 0} .config{font-family:monospace}
.note,.why{color:#555;font-size:14px} .cost{color:#333}
.scroll{overflow-x:auto} table.trials{border-collapse:collapse;font-size:13px;width:100%}
table.trials th,table.trials td{border-bottom:1px solid #eee;padding:3px 8px;text-align:right}
table.trials th{background:#fafafa;position:sticky;top:0}
"""


def html_page(s: Search) -> tuple[str, list[str]]:
    """The whole page and the ids of the charts on it (`chart-KEY` divs)."""
    import plotly.io as pio

    charts = []

    def chart(key, fig, why):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=not charts, div_id=f"chart-{key}",
                          config=PLOTLY_CONFIG, default_height=f"{fig.layout.height or 420}px")
        charts.append(key)
        return f"<p class='why'>{why}</p>{div}"

    body = [answer_html(s)]
    if s.confirm is not None and s.confirm.get("accuracy", pd.Series(dtype=float)).notna().any():
        body.append(chart("confirm", fig_confirm(s), "From confirm.csv: the best trials' configs retrained on the "
                          "whole training set with several seeds, and the baseline run the same way."))
    if len(s.trials):
        body.append("<h2>Best so far</h2>" + chart(
            "best_so_far", fig_best_so_far(s), "From trials.csv: each trial's final accuracy at the trial-seconds "
            "spent up to it; the line is the best trial that trained all its epochs. Crosses: trials ASHA stopped "
            "early (their accuracy is from fewer epochs)."))
    if len(s.history):
        body.append("<h2>Learning curves</h2>" + chart(
            "curves", fig_curves(s), "From history.csv: validation accuracy after each epoch of every trial, "
            "coloured by how the trial ended" + (
                "." if s.history.trial_id.nunique() <= CURVE_LINES else
                f"; past {CURVE_LINES} trials, the best {CURVE_LINES} are lines and the others bands: per status "
                "and epoch, the 10th to 90th percentile of their accuracy, the median dashed.")))
    if len(s.trials) and s.trials.accuracy.notna().any():
        body.append("<h2>Searched values</h2>" + chart(
            "parallel", fig_parallel(s), "From trials.csv: one line per trial through its searched values, its "
            "status and its final accuracy."))
    fig, which = importance(s)
    body.append("<h2>Parameter importance</h2>" + (chart("importance", fig, html.escape(which)) if fig is not None
                                                     else f"<p class='why'>{html.escape(which)}</p>"))
    if len(s.trials) and s.trials.accuracy.notna().any():
        body.append("<h2>Accuracy against cost</h2>" + chart(
            "cost", fig_cost(s), "From trials.csv: each trial's final accuracy against the seconds it trained; the "
            "stars mark, for each number of epochs, the best trial that trained all of them."))
    many = len(s.trials) > TABLE_ROWS
    shown = f"the best {TABLE_ROWS} of {len(s.trials)} trials; every one is in trials.csv" if many else (
        "best accuracy first")
    body.append(f"<h2>Trials</h2><p class='why'>From trials.csv (`tune-sota trials`): {shown}.</p>" + table_html(s))
    command = s.run.get("command") or s.result.get("command") or ""
    versions = s.run.get("versions") or {}
    meta = (f"<p class='meta'>{html.escape(str(s.dir))} · <code>{html.escape(command)}</code> · report written "
            f"{time.strftime('%Y-%m-%d %H:%M')} · " + html.escape(", ".join(f"{k} {v}" for k, v in versions.items()))
            + "</p>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tune-sota: {html.escape(s.name)}"
            f"</title><style>{CSS}</style></head><body><h1>Search {html.escape(s.name)}</h1>{meta}"
            + "\n".join(body) + "</body></html>")
    return page, charts


# ---- PNG figures (matplotlib: no browser needed) ------------------------------------------------------


def _mpl(title: str, x: str, y: str, size=(7, 4)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=x, ylabel=y)
    ax.grid(alpha=0.3)
    return fig, ax


def write_pngs(s: Search, folder: Path) -> list[Path]:
    """The charts a README or a paper would want, as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = folder / name
        tmp = path.with_name(f".{name}")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
        written.append(path)

    if len(s.trials):
        t = best_so_far(s.trials, creation_order(s))
        fig, ax = _mpl("Best accuracy so far", "cumulative trial-seconds", "accuracy")
        ax.step(t.cum_s, t.best, where="post", color=STATUS_COLORS["completed"], lw=2, label="best completed so far")
        for status, g in t.groupby("status", sort=False):
            ax.scatter(g.cum_s, g.accuracy.fillna(0), color=STATUS_COLORS.get(status, "#333"),
                       marker="x" if status == results.STOPPED else "o",
                       label="stopped by ASHA" if status == results.STOPPED else status)
        ax.legend(fontsize=8)
        save(fig, "best_so_far.png")
    if len(s.history):
        lines, bands = curve_plan(s)
        title = "Learning curves" if bands.empty else f"Learning curves: the best {len(lines)}, the others as bands"
        fig, ax = _mpl(title, "epoch", "accuracy")
        status = dict(zip(s.trials.trial_id.astype(str), s.trials.status))
        for st, b in bands.groupby("status", sort=False):
            b = b.sort_values("epoch")
            colour = STATUS_COLORS.get(st, "#333333")
            ax.fill_between(b.epoch, b.low, b.high, color=colour, alpha=0.18, lw=0,
                            label=f"{_status_label(st)}: others, 10th-90th pct")
            ax.plot(b.epoch, b["median"], ls="--", color=colour)
        shown = set()
        history = s.history[s.history.trial_id.astype(str).isin(lines)].sort_values("epoch")
        for tid, g in history.groupby(history.trial_id.astype(str), sort=False):
            st = status.get(tid, "unfinished")
            ax.plot(g.epoch, g.accuracy, marker=".", color=STATUS_COLORS.get(st, "#333"), alpha=0.8,
                    label=None if st in shown else st)
            shown.add(st)
        ax.legend(fontsize=8)
        save(fig, "learning_curves.png")
    t = s.trials[s.trials.accuracy.notna()] if len(s.trials) else s.trials
    if len(t):
        fig, ax = _mpl("Accuracy against training cost", "trial-seconds", "accuracy")
        for status, g in t.groupby("status", sort=False):
            ax.scatter(g.time_s, g.accuracy, color=STATUS_COLORS.get(status, "#333"), alpha=0.7, label=status)
        best = best_per_budget(s.trials)
        if len(best):
            ax.plot(best.time_s, best.accuracy, "*:", color="#2ca02c", ms=14, label="best per epoch budget")
            for r in best.itertuples():
                ax.annotate(f"{r.epochs_run} ep", (r.time_s, r.accuracy), textcoords="offset points", xytext=(0, 8),
                            ha="center", fontsize=8)
        ax.legend(fontsize=8)
        save(fig, "accuracy_vs_cost.png")
    imp, _ = importance(s)
    if imp is not None:
        fig, ax = _mpl("Parameter importance (Optuna)", "importance", "")
        n = len(imp.data)
        for i, bar in enumerate(imp.data):
            order = {p: j for j, p in enumerate(imp.data[0].y)}
            ys = [order.get(p, 0) + (i - (n - 1) / 2) * 0.8 / n for p in bar.y]
            ax.barh(ys, bar.x, height=0.8 / n, label=bar.name)
        ax.set_yticks(range(len(imp.data[0].y)), imp.data[0].y)
        ax.legend(fontsize=8)
        save(fig, "importance.png")
    return written


def write(results_dir) -> Path:
    """Write `report.html` (and `figures/*.png`) for a results folder; returns the page's path."""
    s = load(results_dir)
    page, _ = html_page(s)
    path = Path(results_dir) / "report.html"
    write_atomic(path, page)
    write_pngs(s, Path(results_dir) / "figures")
    return path


def write_quietly(results_dir, out=print) -> Path | None:
    """`write`, for the end of a search: a report that fails is a warning, never a failed search."""
    try:
        path = write(results_dir)
    except Exception as e:
        log.warning("the report could not be written (%s: %s); try `tune-sota report %s`",
                    type(e).__name__, e, results_dir)
        return None
    out(f"tune-sota: report: {path}")
    return path


def dashboard(results_dir, port: int = 8080, out=print) -> None:
    """Serve optuna-dashboard on the search's study at http://127.0.0.1:PORT/ until interrupted."""
    import socket

    url = study_url(Path(results_dir))
    if url is None:
        raise UserError(f"{results_dir} has no study.db (searches from before the study was kept on disk have none); "
                        f"give a folder that a current `tune-sota search` wrote")
    with socket.socket() as probe:  # a taken port is one line, not a server traceback
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"--port {port} is in use on 127.0.0.1; pick another, e.g. --port {port + 1}") from None
    from optuna_dashboard import run_server

    out(f"tune-sota: optuna-dashboard for {results_dir} at http://127.0.0.1:{port}/  (Ctrl-C stops it)")
    run_server(url, host="127.0.0.1", port=port)
