"""The `tune-sota` command: `search`, `train`, `trials`, `report`, `dashboard`, `cluster-check`, `gpu-check`.
User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path

from tune_sota.config import SearchSettings, UserError, problem

EPILOG = """examples:
  tune-sota search                              # the offline default: space 'quick' on local Ray
  tune-sota search --space imagenette --gpus-per-trial 0.25
  tune-sota search --resume quick-2             # finish the interrupted search quick-2 (the line Ctrl-C prints)
  tune-sota train --config results/quick/best.yaml
  tune-sota trials results/quick
  tune-sota report results/quick                # (re)write results/quick/report.html and figures/*.png
  tune-sota dashboard results/quick             # optuna-dashboard on the search's study, on 127.0.0.1
  tune-sota search --space my.yaml --time-budget 8h --warm-start results/quick
  tune-sota export results/quick/best.yaml --out model/   # export.pkl (plain fastai) and model.pt2
  tune-sota predict model/ photos/ --out predictions.csv
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other user error (and exit 2)."""

    def error(self, message):
        self.exit(2, f"tune-sota: error: {message} (see `{self.prog} --help`)\n")


SET_HELP = ("override one setting, checked like the file (repeatable; VALUE is YAML): lr=0.01, "
            "search.num_samples=4, search.confirm_top=1, 'lr={loguniform: [1.0e-3, 1.0e-2]}'")


def search_description(d: SearchSettings | None = None) -> str:
    """`search --help`'s account of what a search does, built from the defaults (or `d`) so that it cannot go
    stale when they change."""
    from tune_sota.schedule import rung_shares

    d = d or SearchSettings()
    rungs = " and ".join(f"{s:.0%}" for s in rung_shares(d.grace, d.reduction_factor))
    wait = ", a progressive-resizing trial once it trains at its final size" if d.final_size_rungs else ""
    judged = f"a {d.holdout:.0%} holdout of train/" if d.select_on == "holdout" else "val/"
    return (f"Run a search over a space file. {d.searcher.upper()} proposes trials ({d.startup_trials} at random "
            f"first), judged on {judged}; by default ASHA judges each trial at {rungs} of its own schedule"
            f"{wait}, and stops it there unless it is in the top 1/{d.reduction_factor} of the trials of its "
            f"schedule shape so far. The best {d.confirm_top} configs are then retrained on all of train/ with "
            f"{d.confirm_seeds} seeds each and scored on val/, plainly and with test-time augmentation, beside "
            "the baseline (chapter 7's plain recipe) run the same way. A space's search: section changes any of "
            "this. Writes results/NAME/: best.yaml, trials.csv, history.csv, confirm.csv, study.db, report.html.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tune-sota", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Search chapter 7's training techniques (MixUp, label smoothing, progressive resizing, "
                    "learning rate, epochs) for an xresnet trained from scratch, with Ray Tune, ASHA and Optuna.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    loud = argparse.ArgumentParser(add_help=False)  # every command takes these
    says = loud.add_mutually_exclusive_group()
    says.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the closing summary")
    says.add_argument("-v", "--verbose", action="store_true", help="also tune_sota's debug lines and everything "
                      "Ray and the trial processes print (their logs, warnings and tracebacks)")

    s = sub.add_parser("search", parents=[loud], help="run a hyperparameter search, confirm its winner against "
                       "chapter 7's plain recipe, and export it",
                       description=search_description())
    s.add_argument("--space", default="quick", metavar="NAME|PATH",
                   help="search space: a name in search_spaces/ or a .yaml path (default: quick, offline)")
    s.add_argument("--name", help="experiment name (default: the space's name; a taken name gets -2, -3...)")
    s.add_argument("--results", default="results", metavar="DIR", help="results root (default: results)")
    s.add_argument("--num-samples", type=int, metavar="N", help="trials to run (overrides the space)")
    s.add_argument("--address", metavar="ADDR", help="join a running Ray cluster (e.g. 10.0.0.1:6379 or auto)")
    s.add_argument("--storage", metavar="URI", help="where Ray keeps trials and checkpoints: a directory every "
                   "node sees (NFS) or s3://bucket/path (default: the results root)")
    s.add_argument("--cpus-per-trial", type=float, metavar="N", help="CPUs each trial reserves (overrides the space)")
    s.add_argument("--gpus-per-trial", type=float, metavar="F", help="GPUs each trial reserves; 0.25 puts 4 "
                   "trials on one GPU (overrides the space)")
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="NAME",
                   help="finish the interrupted search NAME (as Ctrl-C prints it); without NAME, the one unfinished "
                   "search of --space. Finished trials are kept, unfinished ones continue from their checkpoints; "
                   "a finished search is never touched")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument("--time-budget", metavar="DURATION", help="wall-clock budget of the trials, e.g. 8h, 90m, 40s: "
                   "once spent no trial starts, running ones stop at the end of their epoch, and the confirmation "
                   "still runs (overrides search.time_budget)")
    s.add_argument("--warm-start", action="append", default=[], metavar="RESULTS_DIR",
                   help="start from an earlier search's best configs (repeatable): they are the first trials, "
                   "trained again on this data; keys this space does not search are ignored, values outside its "
                   "ranges clipped (each said)")
    s.add_argument("--log", action="append", metavar="mlflow[=URI]|wandb[=PROJECT]",
                   help="also log every trial to a tracker through Ray's logger callbacks (repeatable): MLflow "
                   "(default store: results/NAME/mlflow.db) or W&B (offline when there is no API key)")

    t = sub.add_parser("train", parents=[loud], help="train one fixed config outside Ray (e.g. an exported best.yaml)",
                       description="Train one config with every value fixed (an exported best.yaml, or any space "
                                   "file without distributions) outside Ray: one line per epoch, then plain and "
                                   "TTA accuracy. Example: tune-sota train --config results/quick/best.yaml")
    t.add_argument("--config", required=True, metavar="PATH", help="a config or best.yaml with no distributions")
    t.add_argument("--cpus", type=float, metavar="N", help="CPU threads to use (default: all)")
    t.add_argument("--out", metavar="DIR", help="a new folder for the trained model: state.pt (weights), config.yaml, "
                   "scores.json; load it with tune_sota.load_model(DIR) (default: model, model-2... beside --config)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)

    r = sub.add_parser("trials", parents=[loud], help="print the trial table of a search",
                       description="Print one row per trial (tune_sota.load_trials); --history prints one row "
                                   "per trial per epoch (tune_sota.load_history).")
    r.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="a folder that `tune-sota search` wrote, e.g. results/quick")
    shown = r.add_mutually_exclusive_group()
    shown.add_argument("--history", action="store_true", help="one row per trial per epoch")
    shown.add_argument("--confirm", action="store_true", help="one row per confirmation run (the winner's configs "
                       "and the baseline, per seed, scored on val/)")

    rep = sub.add_parser("report", parents=[loud], help="write a search's report.html (and PNG figures) again",
                         description="Write RESULTS_DIR/report.html, one self-contained page that opens offline, "
                                     "and RESULTS_DIR/figures/*.png. Every search writes them when it ends; this "
                                     "rebuilds them, also for folders written by older versions.")
    rep.add_argument("results_dir", metavar="RESULTS_DIR", help="a folder that `tune-sota search` wrote")

    d = sub.add_parser("dashboard", parents=[loud], help="serve optuna-dashboard on a search's study (127.0.0.1 only)",
                       description="Start optuna-dashboard on RESULTS_DIR's Optuna study, bound to 127.0.0.1, "
                                   "and print its URL; Ctrl-C stops it.")
    d.add_argument("results_dir", metavar="RESULTS_DIR", help="a folder that `tune-sota search` wrote")
    d.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    e = sub.add_parser("export", parents=[loud], help="write a model that loads without tune_sota and its data",
                       description="Write DIR/export.pkl (fastai: load_learner('export.pkl').predict(img), with plain "
                                   "fastai, no tune_sota, no training data), DIR/model.pt2 (torch.export: images in "
                                   "[0, 1] in, probabilities out, normalization inside) and DIR/classes.json. "
                                   "Example: tune-sota export results/quick/best.yaml --out model")
    e.add_argument("model", metavar="MODEL", help="a best.yaml, a `tune-sota train --out` folder, or a search's "
                   "trial folder or checkpoint (anything tune_sota.load_model takes)")
    e.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the export")

    pr = sub.add_parser("predict", parents=[loud], help="classify images with a model: one line per image, or a CSV",
                        description="Print one line per image: its path, label, probability and the top classes "
                                    "(or write them to --out as CSV); for a multi-label model, its path, every "
                                    "label above the model's threshold (fitted by the search) and their "
                                    "probabilities. Batches run on the GPU when there is one. "
                                    "Example: tune-sota predict results/quick/export photos/ --tta")
    pr.add_argument("model", metavar="MODEL", help="an export folder or export.pkl (tune-sota export), or anything "
                    "export takes (then the training data must be where its config says)")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched for them recursively")
    pr.add_argument("--out", metavar="CSV", help="write path,label,probability,top (multi-label: path,labels,"
                    "probabilities,threshold) to this CSV instead")
    pr.add_argument("--tta", action="store_true", help="average fastai's test-time augmentation (slower, often "
                    "a little better)")
    pr.add_argument("--top", type=int, default=3, metavar="K", help="classes listed per image (default: 3)")
    pr.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default: 64)")

    c = sub.add_parser("cluster-check", parents=[loud],
                       help="check a Ray cluster before a long search: nodes, versions, storage, data",
                       description="Join the cluster at --address and run a tiny task on every node: its CPUs and "
                                   "GPUs, its Ray, Python and tune_sota versions, whether --storage is writable from "
                                   "it and shared with the other nodes, and whether --space's data folders are "
                                   "there. Exits 1 if anything would stop a search.")
    c.add_argument("--address", required=True, metavar="ADDR", help="the cluster's head: HOST:PORT, or auto")
    c.add_argument("--storage", metavar="URI", help="the --storage the search will use: a folder every node sees "
                   "(NFS) or s3://bucket/path")
    c.add_argument("--space", metavar="NAME|PATH", help="the search space whose data folders every node needs")
    g = sub.add_parser("gpu-check", parents=[loud],
                       help="measure this machine's GPU for a search in about two minutes: versions, trials per GPU",
                       description="Print the device, torch/CUDA/driver versions, native bf16 or not and free memory; "
                                   "then train --space's model at its size with 1, 2 and 4 trials sharing the GPU "
                                   "through Ray (fractional GPUs, as a search runs them): images/s, the share of time "
                                   "spent waiting for data, peak memory per trial, whether the decoded cache went onto "
                                   "the GPU; and advise on gpus_per_trial and NVIDIA MPS. Without a GPU it says so and "
                                   "measures the CPU at a tiny size.")
    g.add_argument("--space", default="imagenette", metavar="NAME|PATH",
                   help="the search space whose model and data to measure (default: imagenette)")
    g.add_argument("--seconds", type=float, metavar="S", help="each trial's measured window (default: 10 on a GPU, "
                   "2 on a CPU)")
    return p


FLAGS = {"num_samples": "--num-samples", "cpus_per_trial": "--cpus-per-trial", "gpus_per_trial": "--gpus-per-trial",
         "time_budget": "--time-budget"}


def _override(space, args):
    """The space with the command line's search settings applied and checked."""
    changes = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    fields = {f.name: f for f in dataclasses.fields(SearchSettings)}
    for k, v in changes.items():
        why = problem(fields[k], float(v) if fields[k].type == "float" else v)
        if why:  # said as the flag the user typed, not as the schema's key
            raise UserError(f"{FLAGS[k]} {why}")
    space.search = dataclasses.replace(space.search, **changes)
    return space


def _search(args) -> int:
    from tune_sota.config import load_space

    space = _override(load_space(args.space, args.set), args)
    from tune_sota import cluster

    cluster.prepare(args.address)  # the cluster's token question is settled before Ray is imported
    from tune_sota import search  # imports Ray: after the checks that need nothing of it
    from tune_sota.progress import parse_log

    trackers = parse_log(args.log)

    from tune_sota import runstate

    name = args.resume if isinstance(args.resume, str) else args.name
    if args.resume and isinstance(args.resume, str) and args.name and args.name != args.resume:
        raise UserError(f"--resume {args.resume} --name {args.name}: name the search once, e.g. --resume {args.resume}")
    changed = [flag for k, flag in FLAGS.items() if getattr(args, k) is not None] + \
        [flag for flag, given in (("--set", args.set), ("--log", args.log), ("--storage", args.storage),
                                  ("--warm-start", args.warm_start)) if given]
    if args.resume and changed:  # Ray restores a search with the settings it started with
        raise UserError(f"--resume continues a search as it was started; drop {', '.join(changed)} "
                        f"(or start a new search without --resume)")
    try:
        outcome = search.run(space, name=name, results_root=args.results, storage=args.storage,
                             address=args.address, resume=bool(args.resume), command=search.command_line(),
                             log=trackers, warm_start=args.warm_start,
                             on_lost=_interrupted)
    except runstate.SearchInterrupted as stopped:
        return _interrupted(stopped)
    _summary(outcome)
    # A search that trained nothing to the end has no answer: say so in the exit code too, so that a
    # script or CI running it (and a bug that makes every trial raise) does not pass as a success.
    return 0 if outcome.best is not None else 1


def _budget_line(o) -> None:
    """How the time budget was spent: the trials' share, what it stopped, the confirmation after it."""
    from tune_sota import results

    b = getattr(o, "budget", None)
    if not b:
        return
    counts = o.trials.status.value_counts().to_dict() if len(o.trials) else {}
    if b["spent"]:
        how = (f"spent after {results.clock(b['spent_after_s'])}: {counts.get(results.OUT_OF_TIME, 0)} running "
               f"trial(s) stopped at the end of their epoch, {counts.get(results.NOT_STARTED, 0)} never started")
    else:
        how = "not spent: every trial ran"
    print(f"  time budget {results.clock(b['time_budget_s'])} {how}; trials took {results.clock(b['trials_s'])}, "
          f"the confirmation after them {results.clock(b.get('confirm_s', 0.0))}")


def _exported(o) -> None:
    if getattr(o, "export_dir", None) is not None:
        print(f"  model:       {o.export_dir}/export.pkl, model.pt2  (tune-sota predict {o.export_dir} IMAGES...)")


def _interrupted(stopped) -> int:
    """The lines of a search stopped by a signal, with the command that resumes it; returns the exit code."""
    _counts(stopped.outcome, "interrupted after")
    if stopped.cut:
        print(f"  {stopped.cut} trial(s) stopped mid-epoch; they go on from their last checkpoint")
    print(f"  nothing was exported; resume with: {stopped.command}", flush=True)
    return stopped.exit_code


def _counts(o, what: str = "done in") -> None:
    """The summary's first lines: how the trials ended, and the name the search got."""
    from tune_sota import results

    counts = o.trials.status.value_counts().to_dict() if len(o.trials) else {}
    parts = ", ".join(f"{n} {results.STATUS_HELP[s] if s == results.STOPPED else s}" for s, n in counts.items())
    print(f"\ntune-sota: {o.name} {what} {results.clock(o.wall_s)}: "
          f"{len(o.trials)} trials ({parts})")
    if o.renamed_from:
        print(f"  '{o.renamed_from}' was taken, so this search is '{o.name}'")
    _budget_line(o)


def _summary(o) -> None:
    from tune_sota import results, uncertainty

    _counts(o)
    for _, row in o.trials[o.trials.status.isin([results.ERROR, results.DIVERGED])].iterrows():
        print(f"  {row.status}: {row.trial_id} {row.error}")
    if o.best is None:
        failed = o.trials[o.trials.error.fillna("") != ""] if len(o.trials) else o.trials
        first = f"; the first error: {failed.error.iloc[0]}" if len(failed) else ""
        print(f"  no trial trained all its epochs, so there is no best config to export{first}")
        _disk(o)
        return
    b, a = o.best_row, o.answer
    searched = [k for k in o.trials.columns if hasattr(o.best, k) and k not in ("epochs",)] + ["epochs"]
    values = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in ((k, getattr(o.best, k)) for k in dict.fromkeys(searched)))
    judged = "on the holdout" if o.select_on == "holdout" else "on val/"
    if a is None:
        why = "confirm_top is 0" if o.confirmed is None or not len(o.confirmed) else \
            f"every confirmation run failed, first: {o.confirmed.error.iloc[0]}"
        print(f"  best trial {b['trial_id']}: accuracy {b['accuracy']:.4f} {judged} after {b['epochs_run']} epochs "
              f"(not confirmed: {why})")
    else:
        w, base = a["winner"], a["baseline"]
        n = len(w["seeds"])
        print(f"  winner {w['trial_id']} (accuracy {b['accuracy']:.4f} {judged}), confirmed on val/ over {n} seed(s): "
              f"{_pm(w['accuracy_mean'], w['accuracy_std'])}, with TTA {_pm(w['tta_mean'], w['tta_std'])}")
        if base is not None:
            print(f"  baseline (chapter 7's plain recipe, same seeds and {w['epochs']} epochs): "
                  f"{_pm(base['accuracy_mean'], base['accuracy_std'])}, "
                  f"with TTA {_pm(base['tta_mean'], base['tta_std'])}")
            cost = o.trials.time_s.sum() + a["confirm_s"]
            print(f"  gain: {a['gain_points']:+.1f} points ({a['gain_tta_points']:+.1f} with TTA) over the baseline, "
                  f"for {results.clock(o.trials.time_s.sum())} of trials and {results.clock(a['confirm_s'])} of "
                  f"confirmation "
                  f"({results.clock(cost)} of trial-time in all)")
            if a.get("gain"):
                print(f"  verdict (plain accuracy, without TTA): {uncertainty.gain_line(a['gain'])}")
    print(f"  {values}")
    noise = uncertainty.selection_noise(o.trials)
    if noise:
        print(f"  {uncertainty.selection_line(noise, o.select_on)}")
    for note in _edges(o):
        print(f"  note: {note}")
    if o.select_on == "val":
        print("  note: trials were judged on val/ (select_on: val), so these figures are optimistic: the data that "
              "chose the winner also scores it")
    if o.metric:
        print(f"  {o.metric}")
    print(f"  best config: {o.results_dir}/best.yaml  (retrain: tune-sota train --config {o.results_dir}/best.yaml)")
    _exported(o)
    tables = "trials.csv, history.csv" + (", confirm.csv" if o.answer else "")
    print(f"  tables:      {o.results_dir}/{tables}  (tune-sota trials {o.results_dir})")
    _disk(o)


def _edges(o) -> list[str]:
    """The winner's values at the edge of their searched ranges (from the search's own space.yaml)."""
    import yaml

    from tune_sota import results
    from tune_sota.config import parse_space

    saved = o.results_dir / "space.yaml"
    if not saved.is_file():
        return []
    return results.edge_notes(parse_space(yaml.safe_load(saved.read_text()), source=str(saved)), o.best)


def _disk(o) -> None:
    from tune_sota.model import human

    if getattr(o, "disk_bytes", None) is not None:
        print(f"  disk:        {human(o.disk_bytes)} kept by this search (checkpoints of its best trials only, "
              f"unless search.keep_checkpoints is all)")


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}%"


def _train(args) -> int:
    from tune_sota import model
    from tune_sota.config import load_space

    cfg = load_space(args.config, args.set).fixed()
    out = Path(args.out).resolve() if args.out else model.default_out(args.config)
    if out.exists():  # said now, not after the training
        raise UserError(f"--out {out} exists; give a new folder (a model is never overwritten)")
    from tune_sota import preflight

    preflight.check_presize(cfg.data, preflight.check_data(cfg.data), cfg.item_size)
    from tune_sota import pretrained, recipe

    pretrained.resolve(cfg.pretrained, cfg.arch, download=True)  # published weights into the cache, or one line

    def on_epoch(r, learn):
        head = " (head only)" if r.frozen else ""  # fine-tuning's frozen phase
        print(f"epoch {r.epoch}/{r.epochs} at {r.size}px{head}  train_loss {r.train_loss:.4f}  valid_loss "
              f"{r.valid_loss:.4f}  accuracy {r.accuracy:.4f}  ({r.epoch_s:.1f}s)", flush=True)

    t0 = time.time()
    learn = recipe.train(cfg, cpus=args.cpus, on_epoch=on_epoch, progress=sys.stdout.isatty())
    s = recipe.score(learn)
    print(f"accuracy {s['accuracy']:.4f}, with TTA {s['tta_accuracy']:.4f}")
    model.save(learn, cfg, out, s, train_s=round(time.time() - t0, 1), command=" ".join(["tune-sota", *sys.argv[1:]]))
    print(f"model: {out}  (load it: tune_sota.load_model({str(out)!r}))")
    return 0


def _export(args) -> int:
    from tune_sota import export

    out = export.export(args.model, Path(args.out).resolve())
    print(f"tune-sota: exported {args.model} to {out}: {export.EXPORT_FILE} (fastai.learner.load_learner), "
          f"{export.PROGRAM_FILE} (torch.export.load), {export.CLASSES_FILE}")
    return 0


def _predict(args) -> int:
    from tune_sota import export

    if args.top < 1 or args.batch_size < 1:
        raise UserError(f"--{'top' if args.top < 1 else 'batch-size'} must be at least 1")
    if args.out and Path(args.out).exists():
        raise UserError(f"--out {args.out} exists; give a new file (nothing is overwritten)")
    files = export.images(args.paths)
    learn = export.load(args.model)
    probs, classes = export.predict(learn, files, tta=args.tta, bs=args.batch_size)
    k = min(args.top, len(classes))
    rows = []
    threshold = export.threshold(learn)
    for f, p in zip(files, probs):
        if threshold is not None:  # multi-label: every label above the threshold, most probable first
            above = sorted(((float(v), c) for c, v in zip(classes, p) if v > threshold), reverse=True)
            rows.append({"path": str(f), "labels": " ".join(c for _, c in above),
                         "probabilities": " ".join(f"{c}:{v:.3f}" for v, c in above), "threshold": threshold})
            continue
        top = p.topk(k)
        named = [(classes[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
        rows.append({"path": str(f), "label": named[0][0], "probability": round(named[0][1], 4),
                     "top": " ".join(f"{c}:{v:.3f}" for c, v in named)})
    if args.out:
        import pandas as pd

        from tune_sota.config import write_atomic

        write_atomic(Path(args.out), pd.DataFrame(rows).to_csv(index=False))
        print(f"tune-sota: predicted {len(rows)} image(s) into {args.out}")
    else:
        for r in rows:
            print(f"{r['path']}\t{r['labels']}\t{r['probabilities']}" if threshold is not None else
                  f"{r['path']}\t{r['label']}\t{r['probability']:.4f}\t{r['top']}")
    return 0


def _trials(args) -> int:
    import pandas as pd

    from tune_sota.results import load_confirm, load_history, load_trials

    if args.history:
        frame = load_history(args.results_dir)
    elif args.confirm:
        frame = load_confirm(args.results_dir).drop(columns="path")
    else:
        frame = load_trials(args.results_dir).drop(columns="path")
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(frame.to_string(index=False))
    return 0


def _report(args) -> int:
    from tune_sota import report

    print(f"tune-sota: report: {report.write(args.results_dir)}")
    return 0


def _dashboard(args) -> int:
    from tune_sota import report

    report.dashboard(args.results_dir, port=args.port, out=lambda line: print(line, flush=True))  # before it blocks
    return 0


def _gpu_check(args) -> int:
    from tune_sota.config import load_space

    space = load_space(args.space)
    from tune_sota import gpucheck

    print(gpucheck.report(gpucheck.run(space, seconds=args.seconds)))
    return 0


def _cluster_check(args) -> int:
    from tune_sota.config import load_space

    space = load_space(args.space) if args.space else None
    from tune_sota import cluster

    # Without --storage a search keeps its checkpoints in its results folder: that is what to check then.
    storage = args.storage or "results"
    reports = cluster.cluster_check(args.address, storage=storage, space=space)
    print(f"tune-sota: cluster at {args.address}: {len(reports)} nodes, {sum(r.cpus for r in reports):g} CPUs, "
          f"{sum(r.gpus for r in reports):g} GPUs; storage {storage}"
          f"{'' if args.storage else ' (the default: a search without --storage keeps its trials there)'}")
    ids = {r.node_id for r in reports}
    for r in reports:
        storage = ", storage NOT writable" if r.storage else ", storage writable" + (
            "" if len(reports) < 2 else ", shared" if r.sees == ids else ", NOT shared with the other nodes")
        data = "".join(f", data {'there' if not why else 'MISSING'}: {d}" for d, why in r.data.items())
        print(f"  node {r.node_id[:12]} {r.ip} ({r.host}): {r.cpus:g} CPUs, {r.gpus:g} GPUs, Ray {r.ray}, "
              f"Python {r.python}, tune_sota {r.tune_sota or 'MISSING'}{storage}{data}")
    found = cluster.problems(reports, args.storage or "results")
    for line in found:
        print(f"  problem: {line}")
    print(f"tune-sota: cluster-check: {len(found)} problem(s)" if found else "tune-sota: cluster-check: ready")
    return 1 if found else 0


LIBRARIES = r"(fastai|fastcore|fasttransform|fastprogress|torch|torchvision|ray|optuna|pandas|sklearn|mlflow)(\.|$)"


def _say_through_logging(level: int) -> None:
    """The library logs (`tune_sota` logger: progress lines, notices); here they reach the terminal, bare,
    at the level --quiet / --verbose chose."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tune_sota")
    logger.handlers[:] = [handler]
    logger.setLevel(level)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _say_through_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    # Notices the libraries raise about their own internals (torch.jit, pkg_resources...), not about ours.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    try:
        return {"search": _search, "train": _train, "trials": _trials, "report": _report,
                "dashboard": _dashboard, "cluster-check": _cluster_check, "gpu-check": _gpu_check,
                "export": _export, "predict": _predict}[args.command](args)
    except UserError as e:
        print(f"tune-sota: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a third Ctrl-C, or one outside a search's trials
        print("tune-sota: interrupted; an unfinished search resumes with: tune-sota search --resume NAME",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
