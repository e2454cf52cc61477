"""Stopping and resuming a search: Ctrl-C is a state, not a crash, and `--resume` finds the search it means.

Stopping. While the Tuner runs, the first SIGINT (Ctrl-C) lets every running trial reach its next
checkpoint (see `search.checkpoint_every`) and then ends the run through Ray Tune's own graceful stop
(SIGUSR1: Ray saves the experiment state once more and stops the trials' workers). SIGTERM, which a
process manager follows with SIGKILL after a grace period, and a second Ctrl-C stop at once: the trials
cut off mid-epoch go back to their last checkpoint. A third Ctrl-C raises KeyboardInterrupt. The trials cut off are
`interrupted`, nothing is exported, and `search.run` raises `SearchInterrupted`, which the CLI turns
into one line with the command that resumes the search and exit code 130 (SIGINT) or 143 (SIGTERM).

State files. ASHA's rung records and the time budget's clock live in `results/NAME/state/`, not beside
`run.yaml`: when the results folder is also Ray's experiment folder (the default storage), `Tuner.restore`
copies every `*.json` and `*.pkl` at its top into Ray's staging folder and writes those copies back over the
originals at each of its syncs, so a resumed search's own `scheduler.json` kept being replaced by the one
it was resumed from. Ray reads only the top of the folder.

Finding. A search's `run.yaml` records its space and its `status`: `running` from the start (so a
killed driver leaves `running`), `interrupted`, or `finished` once its results are exported. A finished
search is never resumed; `--resume` without a name takes the one unfinished search of the space.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path

import yaml
from ray import tune

from tune_sota.config import UserError, write_atomic

log = logging.getLogger(__name__)

RUNNING, INTERRUPTED, FINISHED = "running", "interrupted", "finished"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
RAY_ENDED = ("TERMINATED", "ERROR")  # Ray's trial statuses of a trial that will not run again


class SearchInterrupted(Exception):
    """A search stopped by SIGINT/SIGTERM before its end: nothing was exported; `command` resumes it.
    `cut`: trials stopped mid-epoch (by SIGTERM or a second Ctrl-C) rather than at a checkpoint."""

    def __init__(self, outcome, signum: int, command: str, cut: int = 0):
        super().__init__(f"{outcome.name} interrupted; resume with: {command}")
        self.outcome, self.signum, self.command, self.cut = outcome, signum, command, cut

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (128 + the signal, as shells report it)."""
        return EXIT_CODES.get(self.signum, 128 + int(self.signum))


class Stopped(Exception):
    """Raised by `_Stop.check` between a search's phases once a signal asked it to stop; `cut`: trials
    stopped mid-epoch."""

    def __init__(self, signum: int, cut: int = 0):
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.cut = signum, cut


class _Stop:
    """What the signals asked of the running search; read by `StopAtCheckpoint` in Tune's loop."""

    def __init__(self, out):
        self.out = out
        self.lost = None  # (signum, cut) -> SearchInterrupted: set by the search once its folder is claimed
        self.on_lost = None  # SearchInterrupted -> exit code: tells the user, when Ray died under the search
        self._wake: tuple | None = None  # the socket pair behind signal.set_wakeup_fd, and the fd it replaced
        self.signum: int | None = None  # the first signal; None while nobody asked to stop
        self.presses = 0
        self.now = False  # stop without waiting for checkpoints
        self.waiting: set[str] | None = None  # trials still to reach their next checkpoint
        self.running: set[str] = set()  # trials running at the last step of Tune's loop
        self.cut = 0  # trials stopped mid-epoch
        self.fired = False  # Ray was asked to stop
        self.stepped = False  # Tune's loop has run our callback: it will act on a request
        self._old: dict = {}  # the handlers `catch` replaced
        self._old_env, self._quiet = None, None

    def on_signal(self, signum, frame):
        # A signal handler only records: printing here could re-enter a write to stdout.
        self.presses += 1
        if self.signum is None:
            self.signum = signum
        if signum != signal.SIGINT or self.presses > 1:
            self.now = True
        if self.presses > 2:
            raise KeyboardInterrupt  # Ray's own stop is under way and the user insists
        if self.now or not self.stepped:
            self._fire()

    def release(self):
        """Give SIGINT and SIGTERM back to their handlers from before `catch`."""
        global _current
        if not self._old:
            return
        _current = None
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if self._old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._old_env
        logging.getLogger("ray.tune.tune").removeFilter(self._quiet)
        self._old = {}
        self.ray_done()

    def ray_done(self):
        """The search's Ray is shut down: a signal from now on is acted on at the next `check` alone (no
        SIGUSR1 to Ray, no watcher taking a shut-down Ray for a lost one)."""
        self.fired = True
        for s in self._old:  # Ray's shutdown puts the C-level SIGTERM action back to the default (kill)
            signal.signal(s, self.on_signal)
        if self._wake is not None:
            signal.set_wakeup_fd(self._wake[2])
            self._wake, (r, w, _) = None, self._wake
            w.close()  # ends the watcher (a read of a closed pair returns nothing)
            r.close()

    def check(self):
        """Raise `Stopped` if a signal asked the search to stop: call it after every phase (each Tuner.fit)."""
        if self.signum is not None:
            raise Stopped(self.signum, self.cut)

    def new_run(self):
        """A Tuner's loop starts (the search's, then the confirmation's): it has not been asked anything yet."""
        self.waiting, self.fired, self.stepped, self.running = None, False, False, set()

    def _fire(self):
        """Ask Ray Tune to end the run: its SIGUSR1 handler saves the experiment state and stops the trials."""
        if self.fired or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            return  # not yet inside the Tuner's loop: the callback fires at its first step
        self.fired = True
        self.cut = len(self.waiting if self.waiting is not None else self.running)
        os.kill(os.getpid(), signal.SIGUSR1)

    def step(self, trials):
        """Tune's loop went round once: start waiting for checkpoints, or stop once none is awaited."""
        self.stepped = True
        self.running = {t.trial_id for t in trials if t.status == "RUNNING"}
        if self.signum is None or self.fired:
            return
        if self.waiting is None and not self.now:
            self.waiting = {t.trial_id for t in trials if t.status == "RUNNING"}
            if self.waiting:
                self.out(f"tune-sota: stopping: {len(self.waiting)} running trial(s) stop at their next checkpoint "
                         f"(a rung, their last epoch, or every search.checkpoint_every epochs); Ctrl-C again stops "
                         f"them now, at their last one")
        if self.now or not self.waiting:
            self._fire()

    def reached(self, trial_id: str):
        """A trial checkpointed or ended: it no longer holds up the stop."""
        if self.waiting is not None:
            self.waiting.discard(trial_id)


    def watch(self, gcs_address: str | None) -> None:
        """Watch, in a thread, for a stop signal after which the search's Ray does not answer.

        A scheduler (SLURM's scancel, systemd, `timeout`) signals the whole process group, and a local
        Ray's daemons are in it: they die with the signal, and Ray's calls in the driver then block until
        Ray gives up on its GCS after 60 seconds and ends the process with exit code 1, past a scheduler's
        grace period and with `run.yaml` still `running`. The signal's arrival is read from the wakeup fd,
        which the C-level handler writes even while the main thread is blocked inside Ray; once the GCS
        refuses connections, this thread marks the search interrupted, tells the user (`on_lost`) and ends
        the process with 130 or 143.
        """
        if not gcs_address or not self._old:  # no Ray, or not the main thread (no handlers of ours)
            return
        r, w = socket.socketpair()
        w.setblocking(False)
        r.settimeout(0.5)
        try:
            old = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread after all
            r.close()
            w.close()
            return
        self._wake = (r, w, old)
        threading.Thread(target=self._watch, args=(r, gcs_address), daemon=True, name="tune-sota-ray-watch").start()

    def _watch(self, r: socket.socket, gcs_address: str) -> None:
        signum, refused = None, 0
        while True:
            try:
                got = r.recv(64)
                if not got:
                    return  # released: the search is over
                signum = signum or next((b for b in got if b in EXIT_CODES), None)
            except TimeoutError:
                pass
            except OSError:
                return
            signum = signum or self.signum
            if signum is None:
                continue
            refused = refused + 1 if not _answers(gcs_address) else 0
            if refused >= 2 and self._wake is not None:  # twice, apart: not a busy GCS; not one ray.shutdown ended
                self._lost(signum)
                return

    def _lost(self, signum: int) -> None:
        code = EXIT_CODES.get(signum, 128 + signum)
        try:
            if self.lost is not None:
                stopped = self.lost(signum, len(self.waiting if self.waiting is not None else self.running))
                code = self.on_lost(stopped) if self.on_lost else stopped.exit_code
                if not self.on_lost:
                    log.warning("%s", stopped)
        except Exception:  # noqa: BLE001 (the process ends either way; say why it could not say more)
            log.exception("the search's Ray died after signal %s; its state could not be recorded", signum)
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code)  # the main thread is blocked inside Ray, on a GCS that is gone


def _answers(address: str) -> bool:
    """Whether something accepts connections at HOST:PORT (the GCS of the search's Ray)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except (OSError, ValueError):
        return False


_current: _Stop | None = None  # the stop request of the search running in this process (signals are per process)


class StopAtCheckpoint(tune.Callback):
    """Lets a requested stop wait for the running trials' next checkpoints (see the module docstring).

    Ray pickles its callbacks with the experiment and restores them on resume, so this one keeps no
    state: it forwards to the process's current `_Stop`.
    """

    def setup(self, **info):
        if _current is not None:
            _current.new_run()

    def on_step_end(self, iteration, trials, **info):
        if _current is not None:
            _current.step(trials)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if _current is not None:
            _current.reached(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _current is not None:
            _current.reached(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        if _current is not None:
            _current.reached(trial.trial_id)


class _QuietRayStop(logging.Filter):
    """Drops Ray's own stop messages (its Ctrl-C advice, `Tuner.restore(...)`): ours say what to run."""

    def __init__(self, stop: _Stop):
        super().__init__()
        self.stop = stop

    def filter(self, record):
        return self.stop.signum is None


def catch(out=print) -> _Stop:
    """From now until `release()`, SIGINT and SIGTERM stop the search cleanly (see the module docstring).

    Install it before the first Tuner.fit and call `check()` after each phase, so that no later phase
    (the confirmation, the export) runs once a signal came.
    """
    global _current
    stop = _Stop(out)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return stop
    stop._old = {s: signal.getsignal(s) for s in EXIT_CODES}
    stop._old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    # Ray's SIGINT handler stops at once; ours waits for checkpoints, then uses Ray's SIGUSR1 stop.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    stop._quiet = _QuietRayStop(stop)
    logging.getLogger("ray.tune.tune").addFilter(stop._quiet)
    for s in stop._old:
        signal.signal(s, stop.on_signal)
    _current = stop
    return stop


def command(name: str, results_root, address: str | None = None) -> str:
    """The command line that resumes search `name` (with --results and --address if they were given)."""
    parts = ["tune-sota", "search", "--resume", name]
    if Path(results_root) != Path("results"):
        parts += ["--results", str(results_root)]
    if address:
        parts += ["--address", address]
    return shlex.join(parts)


STATE_DIR = "state"  # beside run.yaml: the search's own state files, out of the reach of Ray's restore


def state_file(results_dir, name: str) -> str:
    """Where a search keeps its state file `name` (`scheduler.json`, `budget.json`): `results/NAME/state/`."""
    return str(Path(results_dir) / STATE_DIR / name)


def relocated(path: str) -> str:
    """A state file's path as a search started before `state/` existed recorded it (Ray pickles the scheduler
    with it): the file moved into `state/`, and that path, so a resumed search reads and writes it there."""
    path = Path(path)
    if path.parent.name == STATE_DIR:
        return str(path)
    new = path.parent / STATE_DIR / path.name
    if path.is_file() and not new.exists():
        new.parent.mkdir(parents=True, exist_ok=True)
        path.replace(new)
    return str(new)


def mark(results_dir: Path, status: str) -> None:
    """Record a search's state in its run.yaml: running, interrupted or finished."""
    path = Path(results_dir) / "run.yaml"
    run = yaml.safe_load(path.read_text()) or {}
    run["status"] = status
    write_atomic(path, yaml.safe_dump(run, sort_keys=False))


def _run_yaml(folder: Path) -> dict:
    path = folder / "run.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def status(folder: Path) -> str | None:
    """A results folder's search: running (or killed), interrupted, finished; None if it holds none."""
    folder = Path(folder)
    if not (folder / "space.yaml").is_file():
        return None
    run = _run_yaml(folder)
    if "status" in run:
        return run["status"]
    # folders written before run.yaml had a status: a finished search wrote its tables at the end
    return FINISHED if (folder / "trials.csv").is_file() else RUNNING


def space_of(folder: Path) -> str:
    """The name of the space a results folder searched."""
    run = _run_yaml(folder)
    if "space" in run:
        return run["space"]
    return re.sub(r"-\d+$", "", folder.name)  # before run.yaml recorded it: the name, less its -N


def target(results_root: Path, name: str | None, space_name: str) -> str:
    """The search `--resume` means: `name` if given, else the one unfinished search of `space_name`."""
    results_root = Path(results_root)
    if name:
        folder = results_root / name
        st = status(folder)
        if st is None:
            raise UserError(f"--resume {name}: {folder} holds no search to resume; drop --resume to start one")
        if st == FINISHED:
            raise UserError(f"--resume {name}: that search has finished (results in {folder}); nothing to resume "
                            f"and nothing was changed; drop --resume to start a new search")
        return name
    found = [(d.name, status(d)) for d in sorted(results_root.iterdir(), key=_natural)
             if d.is_dir() and status(d) is not None and space_of(d) == space_name] if results_root.is_dir() else []
    open_ = [(n, st) for n, st in found if st != FINISHED]
    if len(open_) == 1:
        return open_[0][0]
    if not open_:
        done = f" (finished: {', '.join(n for n, _ in found)})" if found else ""
        raise UserError(f"--resume: no unfinished search of space '{space_name}' in {results_root}{done}; "
                        f"drop --resume to start a new one")
    listed = ", ".join(f"{n} ({st})" for n, st in open_)
    raise UserError(f"--resume: {len(open_)} unfinished searches of space '{space_name}': {listed}; "
                    f"name one, e.g. tune-sota search --resume {open_[-1][0]}")


def _natural(p: Path):
    """quick, quick-2, quick-10 in that order."""
    m = re.fullmatch(r"(.*?)-(\d+)", p.name)
    return (m.group(1), int(m.group(2))) if m else (p.name, 0)
