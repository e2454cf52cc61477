"""The `tune-sota` command: `search`, `train`, `trials`, `report`, `dashboard`. User mistakes print one line
and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings

from tune_sota.config import ConfigError, SearchSettings, UserError, _check_value

EPILOG = """examples:
  tune-sota search                              # the offline default: space 'quick' on local Ray
  tune-sota search --space imagenette --gpus-per-trial 0.25
  tune-sota search --space quick --resume       # finish an interrupted search of the same name
  tune-sota train --config results/quick/best.yaml
  tune-sota trials results/quick
  tune-sota report results/quick                # (re)write results/quick/report.html and figures/*.png
  tune-sota dashboard results/quick             # optuna-dashboard on the search's study, on 127.0.0.1
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other user error (and exit 2)."""

    def error(self, message):
        self.exit(2, f"tune-sota: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tune-sota", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Search chapter 7's training techniques (MixUp, label smoothing, progressive resizing, "
                    "learning rate, epochs) for an xresnet trained from scratch, with Ray Tune, ASHA and Optuna.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("search", help="run a hyperparameter search and export the best trial",
                       description="Run a search over a space file; write results/NAME/{best.yaml,trials.csv,"
                                   "history.csv}. The best trials are re-scored with test-time augmentation.")
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
    s.add_argument("--resume", action="store_true", help="resume the interrupted search named --name (or the "
                   "space's name): finished trials are kept, the Optuna searcher's state is restored")
    s.add_argument("--log", action="append", metavar="mlflow[=URI]|wandb[=PROJECT]",
                   help="also log every trial to a tracker through Ray's logger callbacks (repeatable): MLflow "
                   "(default store: results/NAME/mlflow.db) or W&B (offline when there is no API key)")

    t = sub.add_parser("train", help="train one fixed config outside Ray (e.g. an exported best.yaml)",
                       description="Train one config with every value fixed (an exported best.yaml, or any space "
                                   "file without distributions) outside Ray: one line per epoch, then plain and "
                                   "TTA accuracy. Example: tune-sota train --config results/quick/best.yaml")
    t.add_argument("--config", required=True, metavar="PATH", help="a config or best.yaml with no distributions")
    t.add_argument("--cpus", type=float, metavar="N", help="CPU threads to use (default: all)")

    r = sub.add_parser("trials", help="print the trial table of a search",
                       description="Print one row per trial (tune_sota.load_trials); --history prints one row "
                                   "per trial per epoch (tune_sota.load_history).")
    r.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="a folder that `tune-sota search` wrote, e.g. results/quick")
    r.add_argument("--history", action="store_true", help="one row per trial per epoch")

    rep = sub.add_parser("report", help="write a search's report.html (and PNG figures) again",
                         description="Write RESULTS_DIR/report.html, one self-contained page that opens offline, "
                                     "and RESULTS_DIR/figures/*.png. Every search writes them when it ends; this "
                                     "rebuilds them, also for folders written by older versions.")
    rep.add_argument("results_dir", metavar="RESULTS_DIR", help="a folder that `tune-sota search` wrote")

    d = sub.add_parser("dashboard", help="serve optuna-dashboard on a search's study (127.0.0.1 only)",
                       description="Start optuna-dashboard on RESULTS_DIR's Optuna study, bound to 127.0.0.1, "
                                   "and print its URL; Ctrl-C stops it.")
    d.add_argument("results_dir", metavar="RESULTS_DIR", help="a folder that `tune-sota search` wrote")
    d.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    return p


FLAGS = {"num_samples": "--num-samples", "cpus_per_trial": "--cpus-per-trial", "gpus_per_trial": "--gpus-per-trial"}


def _override(space, args):
    """The space with the command line's search settings applied and checked."""
    changes = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    fields = {f.name: f for f in dataclasses.fields(SearchSettings)}
    for k, v in changes.items():
        try:
            _check_value(fields[k], float(v) if fields[k].type == "float" else v, "")
        except ConfigError as e:
            raise UserError(f"{FLAGS[k]} {str(e).split(': ', 1)[1]}") from None
    space.search = dataclasses.replace(space.search, **changes)
    return space


def _search(args) -> int:
    from tune_sota.config import load_space

    space = _override(load_space(args.space), args)
    from tune_sota import search  # imports Ray: after the checks that need nothing of it
    from tune_sota.progress import parse_log

    trackers = parse_log(args.log)

    outcome = search.run(space, name=args.name, results_root=args.results, storage=args.storage,
                         address=args.address, resume=args.resume, command=search.command_line(), log=trackers)
    _summary(outcome)
    return 0


def _summary(o) -> None:
    from tune_sota import results

    counts = o.trials.status.value_counts().to_dict() if len(o.trials) else {}
    parts = ", ".join(f"{n} {results.STATUS_HELP[s] if s == results.STOPPED else s}" for s, n in counts.items())
    print(f"\ntune-sota: {o.name} done in {time.strftime('%Hh%Mm%Ss', time.gmtime(o.wall_s))}: "
          f"{len(o.trials)} trials ({parts})")
    if o.renamed_from:
        print(f"  '{o.renamed_from}' was taken, so this search is '{o.name}'")
    for _, row in o.trials[o.trials.status.isin([results.ERROR, results.DIVERGED])].iterrows():
        print(f"  {row.status}: {row.trial_id} {row.error}")
    if o.best is None:
        print("  no trial trained all its epochs, so there is no best config to export")
        return
    b = o.best_row
    print(f"  best trial {b['trial_id']}: accuracy {b['accuracy']:.4f}, with TTA {b['tta_accuracy']:.4f} "
          f"after {b['epochs_run']} epochs")
    searched = [k for k in o.trials.columns if hasattr(o.best, k)]
    print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in ((k, getattr(o.best, k)) for k in searched)))
    print(f"  best config: {o.results_dir}/best.yaml  (retrain: tune-sota train --config {o.results_dir}/best.yaml)")
    print(f"  tables:      {o.results_dir}/trials.csv, {o.results_dir}/history.csv  (tune-sota trials {o.results_dir})")


def _train(args) -> int:
    from tune_sota.config import load_space

    cfg = load_space(args.config).fixed()
    from tune_sota import preflight

    preflight.check_data(cfg.data)
    from tune_sota import recipe

    def on_epoch(r, learn):
        print(f"epoch {r.epoch}/{r.epochs} at {r.size}px  train_loss {r.train_loss:.4f}  valid_loss "
              f"{r.valid_loss:.4f}  accuracy {r.accuracy:.4f}  ({r.seconds:.1f}s)", flush=True)

    learn = recipe.train(cfg, cpus=args.cpus, on_epoch=on_epoch)
    s = recipe.score(learn)
    print(f"accuracy {s['accuracy']:.4f}, with TTA {s['tta_accuracy']:.4f}")
    return 0


def _trials(args) -> int:
    import pandas as pd

    from tune_sota.results import load_history, load_trials

    frame = load_history(args.results_dir) if args.history else load_trials(args.results_dir).drop(columns="path")
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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit notices from fastai's import
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return {"search": _search, "train": _train, "trials": _trials, "report": _report,
                "dashboard": _dashboard}[args.command](args)
    except UserError as e:
        print(f"tune-sota: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune-sota: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
