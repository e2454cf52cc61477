"""Ray, local or a cluster: a plain search starts its own local Ray, `--address` joins a cluster that
`ray start` made, and a cluster that cannot be joined is one line naming the real cause.

Light imports at module level (no Ray): preflight calls `check_address` before Ray is imported.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from tune_sota.config import UserError

log = logging.getLogger("tune_sota.cluster")


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


def check_address(address: str | None) -> None:
    """A cluster address must answer before Ray is asked to join it (Ray would retry for minutes)."""
    resolved = resolve_address(address)
    if resolved is None or resolved.startswith("ray://"):
        return
    named = f"--address {address}" if resolved == address else f"--address {address} ({resolved})"
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{named}: expected HOST:PORT of a Ray head node, e.g. 10.0.0.1:6379, or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        stale = "; the cluster recorded there has stopped" if resolved != address else ""
        raise UserError(f"{named}: nothing answers there ({e.strerror or e}){stale}; start the head with "
                        f"`ray start --head --port {port}`, or drop --address for local Ray") from None


def connect(address: str | None, settings):
    """Start a local Ray of our own (no address) or join a cluster; the dashboard stays off.

    Without an address Ray is started with `address="local"`: a plain `ray.init()` would join whatever
    cluster Ray's `ray_current_cluster` file names, another user's included, or hang on a dead one.
    `settings` are the search settings: a cluster without the CPUs or GPUs a trial asks for is an error.
    """
    import optuna
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our Progress lines replace Ray's status tables
    # Save the experiment's state (trials, searcher, scheduler) every few seconds, so that a killed
    # driver loses at most that much on --resume; the state is small next to a trial's checkpoint.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_workers = {"env_vars": {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}}
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True,
                  runtime_env=quiet_workers)
    resolved = resolve_address(address)
    if resolved:
        check_address(address)
        try:
            context = ray.init(address=resolved, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--address {address}: cannot reach a Ray cluster there ({str(e).splitlines()[0]}); "
                            f"start one with `ray start --head` or drop --address for local Ray") from None
    else:
        context = ray.init(address="local", **kwargs)
    have = ray.cluster_resources()
    for key, asked in (("GPU", settings.gpus_per_trial), ("CPU", settings.cpus_per_trial)):
        if asked > have.get(key, 0):  # Ray would otherwise wait forever for a node that never comes
            ray.shutdown()
            flag = f"--{key.lower()}s-per-trial"
            raise UserError(f"{key.lower()}s_per_trial {asked:g} but the Ray cluster has {have.get(key, 0):g} "
                            f"{key}s; use {flag} {have.get(key, 0):g} or less, or add nodes")
    return context
