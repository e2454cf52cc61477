"""Ray, local or a cluster: a plain search starts its own local Ray, `--address` joins a cluster that
`ray start` made (with its token authentication), a cluster that cannot be joined is one line naming
the real cause, and `cluster_check` reports what a long search needs from every node.

Light imports at module level (no Ray): the CLI calls `prepare` before Ray is imported, since Ray reads
its token-authentication mode once, at import.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tune_sota.config import UserError

log = logging.getLogger("tune_sota.cluster")

DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"


def current_cluster_file() -> Path:
    """The file in which `ray start` records the cluster that `--address auto` joins."""
    # Ray's own rule (ray._common.utils.get_default_system_temp_dir), without importing Ray.
    system_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(system_tmp) / "ray" / "ray_current_cluster"


def resolve_address(address: str | None) -> str | None:
    """None for a local Ray of this search's own; otherwise the HOST:PORT (or ray:// URI) to join.

    `auto` is what Ray would pick: `RAY_ADDRESS`, else the cluster the last `ray start` on this machine
    recorded. Ray itself would, failing both, join any Ray running here (another user's search, too).
    """
    if not address or address == "local":
        return None
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    recorded = current_cluster_file()
    if not recorded.is_file() or not recorded.read_text().strip():
        raise UserError(f"--address auto: no cluster was started with `ray start` on this machine (no {recorded}); "
                        f"start one with `ray start --head`, give --address HOST:PORT, or drop --address for "
                        f"local Ray")
    return recorded.read_text().strip()


def _named(address: str, resolved: str) -> str:
    return f"--address {address}" if resolved == address else f"--address {address} ({resolved})"


def check_address(address: str | None) -> None:
    """A cluster address must answer before Ray is asked to join it (Ray would retry for minutes)."""
    resolved = resolve_address(address)
    if resolved is None or resolved.startswith("ray://"):
        return
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{_named(address, resolved)}: expected HOST:PORT of a Ray head node, e.g. 10.0.0.1:6379, "
                        f"or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        stale = "; the cluster recorded there has stopped" if resolved != address else ""
        raise UserError(f"{_named(address, resolved)}: nothing answers there ({e.strerror or e}){stale}; start the "
                        f"head with `ray start --head --port {port}`, or drop --address for local Ray") from None


def token_source() -> str | None:
    """Where this machine's Ray token comes from, in Ray's order, or None without one.

    `RAY_AUTH_TOKEN`, else the file `RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token` (which
    `ray get-auth-token --generate` writes, and a local Ray makes on first use).
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return str(path)
    return None


def token_error(named: str, source: str | None, tried: bool = False) -> UserError:
    """The one line for a cluster that refused this driver: what is missing and the exact fix.
    `tried`: the token in `source` was offered and refused."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    copy = ("copy the head's token (`ray get-auth-token` on the head prints it) into ~/.ray/auth_token on this "
            "machine, or point RAY_AUTH_TOKEN_PATH at a file holding it, or set RAY_AUTH_TOKEN")
    if source and mode.lower() != "token" and not tried:
        return UserError(f"{named}: the cluster uses token authentication but RAY_AUTH_MODE={mode or '(unset)'} "
                         f"here; set RAY_AUTH_MODE=token (the token in {source} is then used); see {DOCS}")
    if source:
        return UserError(f"{named}: the cluster uses token authentication and refused the token in {source}: it "
                         f"is not the head's; {copy}; see {DOCS}")
    return UserError(f"{named}: the cluster uses token authentication and this machine has no Ray token; "
                     f"{copy}; see {DOCS}")


def _is_auth_error(e: BaseException | None) -> bool:
    """Whether Ray refused us for the token (Ray wraps the refusal in ConnectionError/RuntimeError)."""
    while e is not None:
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e) or \
                "AuthenticationError" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def version_error(named: str, message: str) -> UserError | None:
    """The one line for Ray's "Version mismatch" (cluster and driver on other Ray or Python versions)."""
    if "Version mismatch" not in message:
        return None
    ray_v = re.findall(r"Ray: (\S+)", message)
    py_v = re.findall(r"Python: (\S+)", message)
    if len(ray_v) < 2 or len(py_v) < 2:
        return UserError(f"{named}: the cluster runs other Ray or Python versions than this machine; install the "
                         f"cluster's versions here")
    return UserError(f"{named}: the cluster runs Ray {ray_v[0]} on Python {py_v[0]}, this machine Ray {ray_v[1]} on "
                     f"Python {py_v[1]}; Ray needs the same versions on the driver and every node: "
                     f"`pip install ray=={ray_v[0]}` here (and Python {py_v[0]}), or run tune-sota on the head node")


def _refused(resolved: str, mode: str) -> bool:
    """Whether the cluster's GCS refuses a client in auth `mode` ("disabled", or "token" with this
    machine's token), asked once through Ray's public `ray health-check` in a child process.

    A child process, because Ray reads RAY_AUTH_MODE once, when it is imported: the mode is chosen
    before this process imports Ray. `ray.init` would retry a refused token for about 20 seconds and
    then say only "Failed to connect"; the health check answers in about a second. Anything but a
    refusal (a check that cannot run, a version mismatch) is left to `ray.init`, whose errors are
    mapped too.
    """
    env = {**os.environ, "RAY_AUTH_MODE": mode}
    try:
        run = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "health-check", "--address", resolved],
                             env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode != 0 and ("InvalidAuthToken" in run.stderr or "AuthenticationError" in run.stderr)


_prepared: set[str] = set()  # addresses whose token question is settled in this process


def prepare(address: str | None) -> None:
    """Settle, before Ray is imported, whether this process joins `address` with token authentication;
    or say in one line what is missing. Cheap to call again.

    Ray turns token authentication on by itself only for a cluster it finds on its own (`auto`); for
    an explicit address a user would have to export RAY_AUTH_MODE=token. Here it is turned on when the
    cluster asks for a token and this machine has one. Not otherwise: a driver in token mode refuses
    the calls of a cluster without it, and its trials' actors die before they start.
    """
    resolved = resolve_address(address)
    if resolved is None or resolved.startswith("ray://") or resolved in _prepared:
        return
    check_address(address)
    named = _named(address, resolved)
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":  # chosen already: is the token the head's?
        if _refused(resolved, "token"):
            raise token_error(named, token_source())
    elif _refused(resolved, os.environ.get("RAY_AUTH_MODE", "disabled")):
        source = token_source()
        if not source or "RAY_AUTH_MODE" in os.environ:  # none to offer, or the user chose a mode
            raise token_error(named, source)
        if _refused(resolved, "token"):
            raise token_error(named, source, tried=True)
        if "ray" in sys.modules:  # Ray has read its settings: the mode can no longer change here
            raise UserError(f"{named}: the cluster uses token authentication and Ray was imported before "
                            f"tune_sota could turn it on; set RAY_AUTH_MODE=token before Python starts "
                            f"(the token in {source} is then used); see {DOCS}")
        os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray when it is imported, and by every node it starts
        log.info("joining with the Ray token from %s", source)
    _prepared.add(resolved)


FORWARDED = ("TUNE_SOTA_CACHE", "FASTAI_HOME")  # besides every TUNE_SOTA_* variable


def forwarded_env(environ=None) -> dict[str, str]:
    """The variables every trial's worker gets from the driver, whatever its node's own environment: where
    the data and its decoded cache live (TUNE_SOTA_CACHE, FASTAI_HOME, any TUNE_SOTA_*), and the library
    notices kept quiet. A node started with `ray start` has its own environment (its own HOME: the cache
    would otherwise be built under that node's ~/.cache/tune_sota, not where the driver said)."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in FORWARDED or k.startswith("TUNE_SOTA_")}
    return {**env, "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def connect(address: str | None, settings=None):
    """Start a local Ray of our own (no address) or join a cluster; the dashboard stays off.

    Without an address Ray is started with `address="local"`: a plain `ray.init()` would join whatever
    cluster Ray's `ray_current_cluster` file names, another user's included, or hang on a dead one.
    `settings` are the search settings: a cluster without the CPUs or GPUs a trial asks for is an error.
    """
    prepare(address)  # before Ray is imported, if it has not been yet
    import optuna
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our Progress lines replace Ray's status tables
    # Save the experiment's state (trials, searcher, scheduler) every few seconds, so that a killed
    # driver loses at most that much on --resume; the state is small next to a trial's checkpoint.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A successful search shows tune_sota's lines only: the trial processes' own output (library notices,
    # Ray's SIGTERM traceback when a reused worker is shut down) and Ray's warnings in this process (its
    # token-authentication notice at every start) reach the terminal only with --verbose; a trial's error
    # is in its row and its error.txt either way, and what would stop a search is checked by us first.
    # Ray's prefixes carry no colour codes into a file, and its warning that per-epoch checkpoints force
    # experiment snapshots stays quiet: on the driver's disk a snapshot takes milliseconds
    # (bench/tune_overhead.py measures what the search adds).
    verbose = logging.getLogger("tune_sota").isEnabledFor(logging.DEBUG)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    workers_env = {"env_vars": forwarded_env()}
    kwargs = dict(include_dashboard=False, logging_level=logging.INFO if verbose else logging.ERROR,
                  configure_logging=True, runtime_env=workers_env, log_to_driver=verbose)
    resolved = resolve_address(address)
    if resolved:
        named = _named(address, resolved)
        try:
            context = ray.init(address=resolved, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
            ray.shutdown()  # a version mismatch is found after the driver has half joined
            if _is_auth_error(e):
                raise token_error(named, token_source()) from None
            text = "\n".join(str(x) for x in (e, e.__cause__) if x)
            raise version_error(named, text) or UserError(
                f"{named}: cannot reach a Ray cluster there ({str(e).splitlines()[0]}); start one with "
                f"`ray start --head` or drop --address for local Ray") from None
    else:
        context = ray.init(address="local", **kwargs)
    if settings is not None:
        have = ray.cluster_resources()
        for key, asked in (("GPU", settings.gpus_per_trial), ("CPU", settings.cpus_per_trial)):
            if asked > have.get(key, 0):  # Ray would otherwise wait forever for a node that never comes
                ray.shutdown()
                flag = f"--{key.lower()}s-per-trial"
                raise UserError(f"{key.lower()}s_per_trial {asked:g} but the Ray cluster has {have.get(key, 0):g} "
                                f"{key}s; use {flag} {have.get(key, 0):g} or less, or add nodes")
    return context


@dataclass
class NodeReport:
    """What one node offers a search, as a task pinned to it found."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    host: str = ""
    ray: str = ""
    python: str = ""
    tune_sota: str = ""  # '' where tune_sota cannot be imported
    storage: str = ""  # '' where the storage folder is writable, else why not
    data: dict[str, str] = field(default_factory=dict)  # data value -> '' if there, else why not
    sees: set[str] = field(default_factory=set)  # storage markers (node ids) this node can read


def _node_task():
    """The function run on every node; built here so that Ray ships it by value (tune_sota may be
    missing on the node, and that is one of the things it reports)."""

    def probe(storage: str | None, marker: str, data: list[str]) -> dict:
        import platform
        import socket
        from pathlib import Path

        import ray

        try:
            import tune_sota
            version = tune_sota.__version__
        except Exception:  # noqa: BLE001 (not installed, or broken: both mean trials cannot run here)
            version = ""
        out = {"host": socket.gethostname(), "ray": ray.__version__, "python": platform.python_version(),
               "tune_sota": version, "storage": "", "data": {}}
        if storage:
            try:
                if "://" in storage:
                    import pyarrow.fs

                    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
                    with fs.open_output_stream(f"{root.rstrip('/')}/{marker}") as f:
                        f.write(b"tune-sota cluster-check\n")
                else:
                    Path(storage).mkdir(parents=True, exist_ok=True)
                    (Path(storage) / marker).write_text("tune-sota cluster-check\n")
            except Exception as e:  # noqa: BLE001 (reported per node)
                out["storage"] = f"{type(e).__name__}: {e}".splitlines()[0]
        for d in data:
            folder = Path(d).expanduser()
            missing = [s for s in ("train", "val") if not (folder / s).is_dir()]
            # a table, or class folders without val/ (split on each node alike: sources.split_view)
            drawn = folder.is_file() or (folder.is_dir() and any(p.is_dir() for p in folder.iterdir()))
            out["data"][d] = "" if (folder.is_dir() and not missing) or drawn else \
                (f"no {folder}" if not folder.exists() else f"{folder} has no {'/, '.join(missing)}/")
        return out

    def sees(storage: str, prefix: str) -> list[str]:
        from pathlib import Path

        if "://" in storage:
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(storage)
            names = [Path(i.path).name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))]
        else:
            names = [p.name for p in Path(storage).glob(f"{prefix}*")]
        return [n[len(prefix):] for n in names if n.startswith(prefix)]

    def remove(storage: str, names: list[str]) -> None:
        from pathlib import Path

        if "://" in storage:
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(storage)
            for n in names:
                fs.delete_file(f"{root.rstrip('/')}/{n}")
        else:
            for n in names:
                (Path(storage) / n).unlink(missing_ok=True)

    return probe, sees, remove


def _folders(space) -> list[str]:
    """The data values of a space that name folders (named datasets are fetched by each node itself)."""
    if space is None:
        return []
    from tune_sota import sources

    paths = [str(p) for d in space.options("data") for p in sources.data_folders(d)]  # a table's folder and file
    return [p for p in paths if "/" in p or p.startswith(("~", ".")) or Path(p).expanduser().exists()]


def cluster_check(address: str, storage: str | None = None, space=None) -> list[NodeReport]:
    """Join the cluster and run a tiny task on every node: versions, storage and data as each node sees them."""
    if not address:
        raise UserError("cluster-check needs --address HOST:PORT (or auto) of the cluster to check")
    prepare(address)  # before Ray is imported
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if storage and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    data = [str(Path(d).expanduser().resolve()) for d in _folders(space)]
    connect(address)
    try:
        probe, sees, remove = (ray.remote(num_cpus=0)(f) for f in _node_task())
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        reports, prefix = [], f".tune-sota-check-{uuid.uuid4().hex[:8]}-"
        pinned = {n["NodeID"]: NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes}
        futures = [probe.options(scheduling_strategy=pinned[n["NodeID"]]).remote(storage, prefix + n["NodeID"], data)
                   for n in nodes]
        for n, r in zip(nodes, ray.get(futures, timeout=120)):
            res = n.get("Resources", {})
            reports.append(NodeReport(n["NodeID"], n.get("NodeManagerAddress", ""), res.get("CPU", 0),
                                      res.get("GPU", 0), r["host"], r["ray"], r["python"], r["tune_sota"],
                                      r["storage"], r["data"]))
        if storage and all(not r.storage for r in reports):
            _sharing(reports, storage, prefix, pinned, sees, remove)
    finally:
        ray.shutdown()
    return reports


def _sharing(reports: list[NodeReport], storage: str, prefix: str, pinned: dict, sees, remove) -> None:
    """Fill each report's `sees` with the nodes whose marker it reads under `storage`, then remove the markers."""
    import ray

    seen = ray.get([sees.options(scheduling_strategy=pinned[r.node_id]).remote(storage, prefix)
                    for r in reports], timeout=120)
    for r, s in zip(reports, seen):
        r.sees = set(s)
    # each node removes its own marker: where the storage is not shared, no other node can
    ray.get([remove.options(scheduling_strategy=pinned[r.node_id]).remote(storage, [prefix + r.node_id])
             for r in reports], timeout=120)


def unshared(storage: str) -> list[NodeReport]:
    """On the joined Ray: the nodes that cannot write `storage` or do not see what the others write there
    (empty when it is shared, or when the cluster has one node). Each node writes a marker file and lists
    the others', as `cluster-check` does."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return []
    probe, sees, remove = (ray.remote(num_cpus=0)(f) for f in _node_task())
    prefix = f".tune-sota-check-{uuid.uuid4().hex[:8]}-"
    pinned = {n["NodeID"]: NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes}
    found = ray.get([probe.options(scheduling_strategy=pinned[n["NodeID"]]).remote(storage, prefix + n["NodeID"], [])
                     for n in nodes], timeout=120)
    reports = [NodeReport(n["NodeID"], n.get("NodeManagerAddress", ""), 0, 0, r["host"], storage=r["storage"])
               for n, r in zip(nodes, found)]
    failed = [r for r in reports if r.storage]
    if failed:  # a node that cannot write there has no marker to remove (removing it raised); the others do
        ray.get([remove.options(scheduling_strategy=pinned[r.node_id]).remote(storage, [prefix + r.node_id])
                 for r in reports if not r.storage], timeout=120)
        return failed
    _sharing(reports, storage, prefix, pinned, sees, remove)
    ids = {r.node_id for r in reports}
    return [r for r in reports if r.storage or r.sees != ids]


def check_storage(storage: str, default: bool) -> None:
    """Refuse, before anything runs, a local `storage` that the joined cluster's nodes do not all share:
    Ray would fail every trial on another machine at its first checkpoint. `default`: the user gave no
    --storage (it is the results root)."""
    if "://" in storage:
        return
    bad = unshared(storage)
    if bad:
        import ray

        ray.shutdown()
        what = "the default --storage, the results folder" if default else "--storage"
        first = bad[0]
        why = first.storage or "does not see what the other nodes write there"
        raise UserError(f"{what} {storage} is not shared by the cluster's nodes (node {first.node_id[:8]} "
                        f"({first.ip}): {why}); give --storage a folder every node sees (NFS) or s3://bucket/path "
                        f"(`tune-sota cluster-check --storage` checks one)")


def problems(reports: list[NodeReport], storage: str | None) -> list[str]:
    """What in a cluster-check would make a search fail or lose work, one line each."""
    import ray

    from tune_sota import __version__

    out = []
    for r in reports:
        where = f"node {r.node_id[:8]} ({r.ip})"
        if not r.tune_sota:
            out.append(f"{where}: tune_sota cannot be imported there; pip install it on every node")
        elif r.tune_sota != __version__:
            out.append(f"{where}: tune_sota {r.tune_sota} there, {__version__} here; install the same version")
        if r.ray != ray.__version__ or r.python != platform.python_version():
            out.append(f"{where}: Ray {r.ray} on Python {r.python} there, Ray {ray.__version__} on Python "
                       f"{platform.python_version()} here; Ray needs the same versions everywhere")
        if r.storage:
            out.append(f"{where}: cannot write --storage {storage} ({r.storage})")
        for d, why in r.data.items():
            if why:
                out.append(f"{where}: data {d} is not there ({why}); copy it to the same path on every node")
    if storage and len(reports) > 1 and all(not r.storage for r in reports):
        ids = {r.node_id for r in reports}
        for r in reports:
            if r.sees != ids:
                out.append(f"node {r.node_id[:8]} ({r.ip}): does not see what other nodes write to --storage "
                           f"{storage}; it must be one shared folder (NFS or similar) or s3://")
    return out
