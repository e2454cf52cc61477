"""Record learning curves for the search simulator (issue 16): the product's own search with nothing
stopped, every trial's final model scored on val/, and seed replicates to measure noise.

    python bench/record_curves.py --trials 40            # one chunk: a search of 40 trials, then scoring
    python bench/record_curves.py --resume               # finish a chunk that was interrupted
    python bench/record_curves.py --trials 3 --set size=16 --set 'epochs={randint: [2, 2]}' ...  # a tiny check

Each chunk is one `tune_sota.search.run` of `bench/curves/space.yaml` (scheduler fifo, searcher random,
searcher seed = the chunk's number, so chunks sample different configs), named `chunk-NNN` under
`--work` (default results/curves, not in git). After its search the chunk's completed trials have their
final checkpoint scored on val/ (plain and with TTA: `recipe.evaluate`), and a share (`--replicate`) of
them is trained again with another seed, outside Ray but by the same `recipe.train`, judged on the
same holdout and scored on val/ too. The chunk's rows are then appended to `bench/curves/curves.csv.gz`
(one row per trial per epoch), its checkpoints deleted, and `bench/curves/README.md` rewritten.
Every phase is recorded in `--work`/manifest.json (copied to `bench/curves/chunks.json` with each table, so
a later session with a fresh work folder numbers its chunks on and keeps the committed rows), so
`--resume` carries on where a chunk stopped:
the search through the product's own `--resume`, the scoring and replicates job by job.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, command, machine  # noqa: E402

from tune_sota import results, runstate, search  # noqa: E402
from tune_sota.config import Config, UserError, load_space, parse_space, write_atomic  # noqa: E402

SPACE = BENCH / "curves" / "space.yaml"
CHUNKS = "chunks.json"  # the manifest's copy beside the table: a later session's work folder starts from it
REPLICATE_SEED = 1000  # a replicate trains with its original's seed + this
# One row per trial per epoch; the per-trial values (config, status, val/ scores) repeat on each row,
# which gzip makes nearly free and which keeps the table one flat file.
EPOCH_COLUMNS = ["epoch", "size", "accuracy", "train_loss", "valid_loss", "epoch_s", "cpu_s"]
TRIAL_COLUMNS = ["chunk", "trial_id", "replicate_of", "seed", "status", "epochs", "val_accuracy", "val_tta",
                 "score_s", "score_cpu_s"]
log = logging.getLogger("record_curves")


def _space_of(manifest: dict) -> Path:
    """The space file a work folder records: stored relative to the repository, so that the committed
    chunks.json means the same file in any checkout (older manifests recorded bench/curves/space.yaml)."""
    return (ROOT / manifest.get("space", SPACE.relative_to(ROOT))).resolve()


def chunk_space(space_file: Path, raw_overrides: list[str], seed: int, trials: int):
    """The chunk's space: the recorder's space file, `--set` overrides, the chunk's seed and trial count."""
    space = load_space(str(space_file), [*raw_overrides, f"search.seed={seed}", f"search.num_samples={trials}"])
    s = space.search
    if s.scheduler != "fifo" or s.searcher != "random" or s.keep_checkpoints != "all":
        raise UserError("the recorder needs search.scheduler fifo, search.searcher random and "
                        "search.keep_checkpoints all (every curve to its end, every final model kept to score)")
    return space


def _final_state(trial_dir: Path) -> Path | None:
    """The newest checkpoint's state file of a trial folder."""
    ckpts = sorted(trial_dir.glob("checkpoint_*"), key=lambda p: p.name)
    return ckpts[-1] / "state.pt" if ckpts and (ckpts[-1] / "state.pt").is_file() else None


def _score(job: dict) -> dict:
    """Score one final checkpoint on val/, plainly and with TTA (in a worker process)."""
    from tune_sota import recipe

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = Config(**{**job["config"], "holdout": 0.0})
    s = recipe.evaluate(cfg, Path(job["state"]).read_bytes(), cpus=1, tta=True)
    return {"trial_id": job["trial_id"], "val_accuracy": s["accuracy"], "val_tta": s["tta_accuracy"],
            "score_s": time.perf_counter() - t0, "score_cpu_s": time.process_time() - c0}


def _replicate(job: dict) -> dict:
    """Train one config again with another seed, on the search's holdout, and score it on val/."""
    from tune_sota import recipe

    rows = []
    cfg = Config(**{**job["config"], "seed": job["seed"]})
    learn = recipe.train(cfg, cpus=1, on_epoch=lambda r, _learn: rows.append(r.row()))
    out = {"trial_id": job["trial_id"], "replicate_of": job["replicate_of"], "seed": job["seed"], "rows": rows,
           "val_accuracy": math.nan, "val_tta": math.nan, "score_s": math.nan, "score_cpu_s": math.nan}
    if rows and not rows[-1]["diverged"]:
        t0, c0 = time.perf_counter(), time.process_time()
        s = recipe.evaluate(Config(**{**cfg.to_dict(), "holdout": 0.0}), recipe.save_state(learn, cfg.epochs), cpus=1)
        out.update(val_accuracy=s["accuracy"], val_tta=s["tta_accuracy"], score_s=time.perf_counter() - t0,
                   score_cpu_s=time.process_time() - c0)
    return out


def _safe(job: dict) -> dict:
    """Run `job["fn"]` (_score or _replicate), a raised error recorded rather than raised: a job that
    fails would fail again on every --resume."""
    fn = {"_score": _score, "_replicate": _replicate}[job["fn"]]
    try:
        return fn(job)
    except Exception as e:
        return {"trial_id": job["trial_id"], "replicate_of": job.get("replicate_of", ""), "rows": [],
                "val_accuracy": math.nan, "val_tta": math.nan, "score_s": math.nan, "score_cpu_s": math.nan,
                "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def _run_jobs(fn, jobs: list[dict], done_file: Path, processes: int) -> list[dict]:
    """Run `fn` over `jobs` in `processes` workers, appending each answer to `done_file` (JSON lines) as it
    comes; jobs already there (an interrupted chunk) are not run again."""
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.is_file() else []
    have = {d["trial_id"] for d in done}
    todo = [j for j in jobs if j["trial_id"] not in have]
    if todo:
        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        with ctx.Pool(min(processes, len(todo)), maxtasksperchild=None) as pool, open(done_file, "a") as fh:
            for answer in pool.imap_unordered(_safe, [{**j, "fn": fn.__name__} for j in todo]):
                fh.write(json.dumps(answer, default=float) + "\n")
                fh.flush()
                done.append(answer)
                log.info("%s: %s %s (%d/%d)", fn.__name__.strip("_"), answer["trial_id"],
                         f"failed: {answer['error']}" if answer.get("error") else "done", len(done), len(jobs))
    return done


def record_chunk(entry: dict, work: Path, manifest: dict, *, replicate: float, overrides: list[str]) -> None:
    """Search, score and replicate one chunk, then write its rows (`chunk.csv`); updates the manifest."""
    name, cdir = entry["name"], work / entry["name"]
    if entry["state"] == "searching":
        state = runstate.status(cdir)  # None: the search never started (or wrote nothing we can resume)
        if state != runstate.FINISHED:
            space = chunk_space(_space_of(manifest), overrides, entry["seed"], entry["trials"])
            t0 = time.time()
            search.run(space, name=name, results_root=work, resume=state is not None, command=entry["command"])
            entry["search_wall_s"] = entry.get("search_wall_s", 0.0) + time.time() - t0
        entry["state"] = "scoring"
        _save_manifest(work, manifest)
    space = parse_space(yaml.safe_load((cdir / "space.yaml").read_text()), name="curves")
    trials, history = results.load_trials(cdir), results.load_history(cdir)
    searched = list(space.searched)
    processes = max(1, space.search.max_concurrent or 1)
    configs = {}
    for row in trials.itertuples():
        params = json.loads((Path(row.path) / "params.json").read_text())
        configs[row.trial_id] = {k: v for k, v in params.items() if k in Config.__dataclass_fields__}
    done = trials[trials.status == results.COMPLETED]
    t0 = time.time()
    jobs = [{"trial_id": t, "config": configs[t], "state": str(_final_state(Path(p)))}
            for t, p in zip(done.trial_id, done.path) if _final_state(Path(p)) is not None]
    scores = _run_jobs(_score, jobs, cdir / "scores.jsonl", processes)
    rng = np.random.default_rng(entry["seed"])
    n_rep = int(round(replicate * len(done)))
    chosen = sorted(rng.choice(sorted(done.trial_id), size=n_rep, replace=False)) if n_rep else []
    rep_jobs = [{"trial_id": f"{t}-r1", "replicate_of": t, "seed": configs[t].get("seed", Config.seed) + REPLICATE_SEED,
                 "config": configs[t]} for t in chosen]
    reps = _run_jobs(_replicate, rep_jobs, cdir / "replicates.jsonl", processes)
    entry["score_wall_s"] = entry.get("score_wall_s", 0.0) + time.time() - t0

    by_id = {s["trial_id"]: s for s in scores}
    frames = []
    for row in trials.itertuples():
        h = history[history.trial_id == row.trial_id].sort_values("epoch")
        s = by_id.get(row.trial_id, {})
        cfg = configs[row.trial_id]
        frames.append(h.reindex(columns=EPOCH_COLUMNS).assign(**{
            **{k: cfg[k] for k in searched}, "chunk": name, "trial_id": row.trial_id, "replicate_of": "",
            "seed": cfg.get("seed", Config.seed), "status": row.status, "epochs": cfg.get("epochs", Config.epochs),
            "val_accuracy": s.get("val_accuracy", math.nan), "val_tta": s.get("val_tta", math.nan),
            "score_s": s.get("score_s", math.nan), "score_cpu_s": s.get("score_cpu_s", math.nan)}))
    for r in reps:
        h = pd.DataFrame(r["rows"]).reindex(columns=[*EPOCH_COLUMNS, "diverged"])
        status = results.ERROR if r.get("error") else results.DIVERGED if h.diverged.any() else results.COMPLETED
        cfg = configs[r["replicate_of"]]
        frames.append(h.drop(columns="diverged").assign(**{
            **{k: cfg[k] for k in searched}, "chunk": name, "trial_id": r["trial_id"],
            "replicate_of": r["replicate_of"], "seed": r["seed"], "status": status,
            "epochs": cfg.get("epochs", Config.epochs),
            "val_accuracy": r["val_accuracy"], "val_tta": r["val_tta"], "score_s": r["score_s"],
            "score_cpu_s": r.get("score_cpu_s", math.nan)}))
    values = [k for k in searched if k not in TRIAL_COLUMNS]  # `epochs` is both searched and a trial column
    table = pd.concat(frames, ignore_index=True)[[*TRIAL_COLUMNS, *values, *EPOCH_COLUMNS]]
    write_atomic(cdir / "chunk.csv", table.to_csv(index=False))
    for p in trials.path:  # the scores are in; the checkpoints (megabytes per epoch) are not needed any more
        for ckpt in Path(p).glob("checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    entry.update(state="recorded", finished=_now(), rows=len(table), trials=int(len(trials)), replicates=len(reps))
    _save_manifest(work, manifest)


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _save_manifest(work: Path, manifest: dict) -> None:
    write_atomic(work / "manifest.json", json.dumps(manifest, indent=1))


def write_table(work: Path, manifest: dict, out: Path) -> pd.DataFrame:
    """All recorded chunks as one table, `out/curves.csv.gz` (byte-identical for identical rows), and
    `out/README.md` describing how they were made."""
    dtype = {"trial_id": str, "replicate_of": str, "resize": str}
    chunks = [e for e in manifest["chunks"] if e["state"] == "recorded"]
    here = [e for e in chunks if (work / e["name"] / "chunk.csv").is_file()]
    frames = [pd.read_csv(work / e["name"] / "chunk.csv", dtype=dtype) for e in here]
    # Chunks recorded in another session (another machine, or a work folder since cleaned) are in the
    # committed table only: keep their rows, ahead of this work folder's.
    committed = out / "curves.csv.gz"
    if committed.is_file():
        old = pd.read_csv(committed, dtype=dtype)
        old = old[~old.chunk.isin({e["name"] for e in here})]
        frames = [old, *frames] if len(old) else frames
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:  # mtime 0: same rows, same bytes
        gz.write(table.to_csv(index=False, float_format="%.5g").encode())
    (out / "curves.csv.gz").write_bytes(buf.getvalue())
    (out / "README.md").write_text(readme(manifest, table))
    write_atomic(out / CHUNKS, json.dumps(manifest, indent=1))  # how each chunk was made, for the next session
    return table


def readme(manifest: dict, table: pd.DataFrame) -> str:
    """What the table is, how each chunk was made, and on what."""
    lines = ["# Recorded learning curves", "",
             "Written by `bench/record_curves.py` (do not edit: it rewrites this file after each chunk). The "
             "table `curves.csv.gz` has one row per trial per epoch: the chunk and trial, `replicate_of` (the trial "
             "a seed replicate repeats; empty for a search trial), the seed, the status, the planned `epochs`, the "
             "final model's accuracy on val/ plainly (`val_accuracy`) and with TTA (`val_tta`) and the wall and CPU "
             "seconds that scoring took (`score_s`, `score_cpu_s`), the searched values, then per epoch: the "
             "training `size`, holdout `accuracy` (what a search judges on; validated at the final size), "
             "`train_loss`, `valid_loss`, wall seconds `epoch_s` and CPU seconds `cpu_s` of the trial's process "
             "(wall seconds count the neighbours on a shared machine; CPU seconds do not).", "",
             "The space is `space.yaml` beside this file (each chunk's exact copy, with its seed, is its "
             "`space.yaml` in the work folder). Search trials ran through `tune_sota.search.run` (Ray Tune, "
             "scheduler fifo, searcher random, 2 trials of 1 CPU at once); replicates ran `recipe.train` directly "
             "with seed + 1000, 2 at once.", "",
             f"Machine: {manifest.get('machine', '?')}", "",
             "| chunk | searcher seed | trials | replicates | rows | search wall | scoring + replicates wall | "
             "finished | command |", "|---|---|---|---|---|---|---|---|---|"]
    for e in manifest["chunks"]:
        lines.append(f"| {e['name']} | {e['seed']} | {e.get('trials', '')} | {e.get('replicates', '')} | "
                     f"{e.get('rows', '')} | {results.clock(e.get('search_wall_s', 0))} | "
                     f"{results.clock(e.get('score_wall_s', 0))} | {e.get('finished', e['state'])} | "
                     f"`{e['command']}` |")
    if len(table):
        trials = table.drop_duplicates("trial_id")
        lines += ["", f"In all: {int((trials.replicate_of.fillna('') == '').sum())} search trials and "
                  f"{int((trials.replicate_of.fillna('') != '').sum())} seed replicates, {len(table)} epoch rows; "
                  f"val/ accuracy {trials.val_accuracy.min():.3f} to {trials.val_accuracy.max():.3f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=40, help="search trials in this chunk (default 40)")
    ap.add_argument("--resume", action="store_true", help="finish the chunk that was interrupted")
    ap.add_argument("--replicate", type=float, default=0.2,
                    help="share of each chunk's completed trials trained again with another seed (default 0.2)")
    ap.add_argument("--work", default="results/curves", help="where the chunks' searches live (default results/curves)")
    ap.add_argument("--space", default=str(SPACE),
                    help="the space to record, its table written beside it (default bench/curves/space.yaml; "
                         "bench/curves-quarter/space.yaml is the second task, issue 26)")
    ap.add_argument("--out", help="where the table and its README go (default: the space file's folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the space file, as `tune-sota search --set` does")
    args = ap.parse_args(argv)
    space_file = Path(args.space).resolve()
    if not space_file.is_file():
        print(f"record_curves: --space {args.space} is not a file; give a space.yaml such as {SPACE}", file=sys.stderr)
        return 2
    args.out = args.out or str(space_file.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mpath = work / "manifest.json"
    if mpath.is_file():
        manifest = json.loads(mpath.read_text())
    elif (Path(args.out) / CHUNKS).is_file():  # a new work folder: carry on from the committed chunks
        manifest = json.loads((Path(args.out) / CHUNKS).read_text())
        _save_manifest(work, manifest)
    else:
        manifest = {"chunks": [], "machine": machine(), "space": str(space_file.relative_to(ROOT))}
    if _space_of(manifest) != space_file:
        print(f"record_curves: {work} records {_space_of(manifest)}, not {space_file}; give it its own "
              f"--work folder", file=sys.stderr)
        return 2
    open_chunks = [e for e in manifest["chunks"] if e["state"] != "recorded"]
    try:
        if open_chunks and not args.resume:
            raise UserError(f"{open_chunks[0]['name']} in {work} is unfinished: finish it first with --resume")
        if args.resume:
            if not open_chunks:
                raise UserError(f"nothing to resume in {work}: every chunk is recorded; start one with --trials N")
            entry = open_chunks[0]
        else:
            n = len(manifest["chunks"]) + 1
            entry = {"name": f"chunk-{n:03d}", "seed": n, "trials": args.trials, "state": "searching",
                     "command": command(), "started": _now(), "replicate": args.replicate, "set": args.set}
            # a bad --set fails before anything is written
            chunk_space(space_file, args.set, entry["seed"], entry["trials"])
            manifest["chunks"].append(entry)
            _save_manifest(work, manifest)
        record_chunk(entry, work, manifest, replicate=entry.get("replicate", args.replicate),
                     overrides=entry.get("set", args.set))
    except UserError as e:
        print(f"record_curves: {e}", file=sys.stderr)
        return 2
    except runstate.SearchInterrupted as stopped:  # Ctrl-C or SIGTERM: the product saved the search
        print(f"record_curves: {stopped.outcome.name} interrupted; finish it with: {command().split(' --')[0]} "
              f"--resume" + (f" --work {args.work}" if args.work != "results/curves" else "")
              + (f" --space {args.space}" if space_file != SPACE else ""), file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # during the scoring or the replicates: what is done is in the work folder
        print("record_curves: interrupted; finish the chunk with --resume (same --work and --out)", file=sys.stderr)
        return 130
    table = write_table(work, manifest, Path(args.out))
    log.info("table: %s (%d rows, %d trials); README: %s", Path(args.out) / "curves.csv.gz", len(table),
             table.trial_id.nunique() if len(table) else 0, Path(args.out) / "README.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
