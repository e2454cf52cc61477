"""Clusters as users start them: real `ray start` processes on 127.0.0.1 with token authentication,
`tune-sota search --address` and `tune-sota cluster-check` against them, and local Ray that stays
local whatever cluster files are lying around. Every process a test starts is stopped by its own id."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, cli, make_image_folder, tiny, write_space
from tune_sota import load_trials

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp():
    """A Ray temp folder of the test's own (short: Ray's socket paths must stay under ~100 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tsc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str):
    err = run.stderr.strip()
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("tune-sota: error: "), err
    for f in fragments:
        assert f in err, err


def test_local_search_ignores_a_stale_cluster_file(ray_tmp):
    # What a `ray start` cluster that died leaves behind: the file naming it. A plain ray.init() would
    # retry that address for minutes; the search starts a Ray of its own instead.
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    code = ("import ray; from tune_sota import cluster; from tune_sota.config import SearchSettings\n"
            "ctx = cluster.connect(None, SearchSettings()); print('GCS', ctx.address_info['gcs_address'])\n"
            "ray.shutdown()")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    gcs = next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("GCS "))
    assert gcs != dead and time.time() - t0 < 120


def test_auto_names_a_dead_cluster_in_one_line_within_seconds(ray_tmp, tmp_path, monkeypatch, image_folder):
    space = write_space(tmp_path / "s.yaml", tiny(image_folder))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = cli("cluster-check", "--address", "auto", timeout=60)  # joins as search does, without torch's import
    assert_one_line_error(run, "--address auto: no cluster was started with `ray start`", "ray start --head")

    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    t0 = time.time()
    run = cli("search", "--space", space, "--address", "auto", "--results", tmp_path / "results", timeout=60)
    assert_one_line_error(run, f"--address auto ({dead}): nothing answers there", "has stopped")
    assert time.time() - t0 < 30 and not (tmp_path / "results").exists()


def run_cli(env: dict, *args, timeout=600) -> subprocess.CompletedProcess:
    """`tune-sota ARGS` as a user on another machine (HOME, RAY_TMPDIR...) would run it."""
    return subprocess.run([sys.executable, "-m", "tune_sota.cli", *map(str, args)], cwd=ROOT,
                          env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=timeout)


def user_env(root: Path, home: Path, **extra) -> dict:
    """The environment of a user whose home is `home`: no Ray settings but what they export."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "RAY_TMPDIR": str(root), **extra}


class RayNodes:
    """`ray start` processes of one test: each in a session of its own, stopped by its process group."""

    def __init__(self, root: Path):
        self.root, self.groups, self.address = root, [], None

    def start(self, env: dict, *args, private: tuple[Path, ...] = ()) -> str:
        """Run `ray start ARGS` (which returns once its daemons run); the cluster's address. `private`:
        folders this node does not share with the others, as a second machine would not: the node runs in
        a mount namespace of its own (`unshare --mount`) with an empty tmpfs over each of them."""
        argv = [shutil.which("ray") or "ray", "start", "--num-cpus", "1", "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(free_port()),
                *map(str, args)]
        if private:
            mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(p))}" for p in private)
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f"{mounts} && exec {shlex.join(argv)}"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.groups.append(proc.pid)  # the daemons it starts keep its session and process group
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        self.address = (self.root / "ray" / "ray_current_cluster").read_text().strip()
        return self.address

    def mine(self) -> list[int]:
        """Live processes of ours: in our process groups, or naming our temp folder."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            state, pgid = stat.rsplit(")", 1)[1].split()[0], int(stat.rsplit(")", 1)[1].split()[3])
            if state != "Z" and (pgid in self.groups or str(self.root) in cmdline):
                pids.append(int(proc.name))
        return pids

    def stop(self):
        """SIGTERM our processes, SIGKILL what is left after 4 s; never `ray stop` (it stops every Ray here)."""
        for sig, grace in ((15, 4), (9, 5)):
            for pid in self.mine():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + grace
            while self.mine() and time.time() < end:
                time.sleep(0.5)
        assert not self.mine(), f"processes of this test still run: {self.mine()}"


@pytest.fixture
def nodes(ray_tmp):
    n = RayNodes(ray_tmp)
    try:
        yield n
    finally:
        n.stop()


def test_two_node_cluster_as_users_start_it(nodes, ray_tmp, tmp_path, slower_folder):
    home = ray_tmp / "home"  # the user's home on every "machine": ~/.ray/auth_token is the cluster's token
    env = user_env(ray_tmp, home)
    # The README's recipe: the head makes the token, every node and the driver find it in ~/.ray/auth_token.
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert token.returncode == 0 and (home / ".ray" / "auth_token").is_file(), token.stderr
    node_env = {**env, "RAY_AUTH_MODE": "token"}
    head = nodes.start(node_env, "--head", "--port", free_port(), "--include-dashboard", "false",
                       "--dashboard-port", free_port(), "--temp-dir", ray_tmp / "ray")
    nodes.start(node_env, "--address", head)

    # All four trials are proposed at once (a fixed config run 4 times), and each (about 10 s) outlasts
    # the skew between two trial processes importing torch and fastai side by side: otherwise the
    # head's process, reused, may take every trial while the worker node's is still starting.
    data = slower_folder
    space = write_space(tmp_path / "two.yaml", tiny(data, size=32, presize=32, epochs=12),
                        {"num_samples": 4, "max_concurrent": 2, "cpus_per_trial": 1, "confirm_top": 0})
    shared = tmp_path / "shared"
    # The driver exports nothing: it finds the token and turns token authentication on itself.
    run = run_cli(env, "search", "--space", space, "--address", head, "--storage", shared,
                  "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = load_trials(tmp_path / "results" / "two")
    assert len(trials) == 4 and trials.node.nunique() == 2, run.stdout[:5000]
    assert (tmp_path / "results" / "two" / "best.yaml").is_file()

    check = run_cli(env, "cluster-check", "--address", head, "--storage", shared, "--space", space, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    lines = [line for line in check.stdout.splitlines() if line.strip().startswith("node ")]
    assert len(lines) == 2 and "2 nodes, 2 CPUs" in check.stdout and "cluster-check: ready" in check.stdout
    assert {line.split()[1] for line in lines} == set(trials.node), "the nodes the trials ran on"
    for line in lines:
        assert "Ray 2." in line and "tune_sota 0." in line and "storage writable" in line, line
        assert f"data there: {data.resolve()}" in line, line
    assert not list(shared.glob(".tune-sota-check-*")), "cluster-check removes what it wrote"
    missing = write_space(tmp_path / "missing.yaml", tiny(tmp_path / "not-copied"))
    check = run_cli(env, "cluster-check", "--address", head, "--space", missing, timeout=300)
    assert check.returncode == 1 and check.stdout.count("problem: node") == 2, check.stdout + check.stderr
    assert f"data {tmp_path / 'not-copied'} is not there" in check.stdout

    # A driver without the token, or with another one: one line naming token authentication and the fix.
    # (cluster-check joins the way search does, and answers without importing torch and fastai.)
    no_token, wrong_token = user_env(ray_tmp, ray_tmp / "nohome"), user_env(ray_tmp, home, RAY_AUTH_TOKEN="not-it")
    for user, argv, fragments in (
            (no_token, ("search", "--space", space, "--results", tmp_path / "refused"), ["has no Ray token"]),
            (no_token, ("cluster-check",), ["has no Ray token"]),
            (wrong_token, ("cluster-check",), ["refused the token in RAY_AUTH_TOKEN", "it is not the head's"])):
        t0 = time.time()
        run = run_cli(user, *argv, "--address", head, timeout=120)
        assert_one_line_error(run, f"--address {head}: the cluster uses token authentication", *fragments,
                              "`ray get-auth-token` on the head", "~/.ray/auth_token")
        assert time.time() - t0 < 60 and not (tmp_path / "refused").exists()

    # A program that imported Ray before tune_sota: Ray has read its auth mode, so the fix is to export it.
    code = (f"import ray\nfrom tune_sota import cluster\ntry:\n    cluster.connect({head!r})\n"
            f"    print('JOINED', len(ray.nodes()))\nexcept Exception as e:\n    print('ERROR', e)")
    imported_first = "ERROR --address {}: the cluster uses token authentication and Ray was imported before tune_sota"
    for user, expected in ((env, imported_first.format(head)), (node_env, "JOINED 2")):
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user, capture_output=True, text=True,
                             timeout=120)
        assert expected in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]

    # Ray on the driver and on the cluster must match: pretend the cluster was started by another Ray.
    relabel = (f"import json, ray._raylet as r; c = r.GcsClient(address={head!r}); k, ns = b'CLUSTER_METADATA', "
               f"b'cluster'; m = json.loads(c.internal_kv_get(k, ns)); m['ray_version'] = '2.59.0'; "
               f"c.internal_kv_put(k, json.dumps(m).encode(), True, ns)")
    subprocess.run([sys.executable, "-c", relabel], env=node_env, check=True, timeout=60)
    run = run_cli(env, "cluster-check", "--address", head, timeout=120)
    assert_one_line_error(run, "the cluster runs Ray 2.59.0 on Python", "this machine Ray 2.60",
                          "pip install ray==2.59.0")

    # The cluster stops; the file naming it stays: `--address auto` says so at once.
    nodes.stop()
    t0 = time.time()
    run = run_cli(env, "search", "--space", space, "--address", "auto", "--results", tmp_path / "dead", timeout=60)
    assert_one_line_error(run, f"--address auto ({head}): nothing answers there", "has stopped")
    assert time.time() - t0 < 30


def _can_unshare() -> bool:
    """Whether this machine lets a test give a process a mount namespace with a tmpfs of its own (root)."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True, timeout=30) \
        if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory):
    """One cluster without token authentication, for the two tests that need one: a head and, where this
    machine lets a test give a process a mount namespace (root, as in CI), a worker as a second machine is:
    its own view of a results folder and of a cache (a private tmpfs over each), its own HOME and no
    TUNE_SOTA_CACHE. Starting it once saves a test its own `ray start` head."""
    root = Path(tempfile.mkdtemp(prefix="tsc-", dir="/tmp"))
    apart = tmp_path_factory.mktemp("apart")
    results, cache = apart / "results", apart / "cache"
    for d in (results, cache):
        d.mkdir()
    env = user_env(root, root / "home", RAY_AUTH_MODE="disabled", TUNE_SOTA_CACHE=str(cache))
    nodes = RayNodes(root)
    try:
        head = nodes.start(env, "--head", "--port", free_port(), "--include-dashboard", "false",
                           "--dashboard-port", free_port(), "--temp-dir", root / "ray")
        worker = None
        if _can_unshare():
            worker_env = {k: v for k, v in env.items() if not k.startswith("TUNE_SOTA")} | {"HOME": str(root / "w")}
            nodes.start(worker_env, "--address", head, private=(results, cache))
            worker = nodes.groups[-1]
        yield SimpleNamespace(nodes=nodes, root=root, env=env, head=head, worker=worker, results=results,
                              cache=cache)
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.xdist_group("open_cluster")
def test_a_token_here_does_not_lock_out_a_cluster_without_token_auth(open_cluster):
    # A driver that turned token authentication on refuses the calls of a cluster without it: its
    # actors (every trial is one) die before they start. The token on this machine is used only when
    # the cluster asks for one.
    env = user_env(open_cluster.root, open_cluster.root / "driver-home")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    head = open_cluster.head
    code = ("import os, ray; from tune_sota import cluster\n"
            f"cluster.connect({head!r})\n"
            "actor = ray.remote(num_cpus=1)(type('Trial', (), {'pid': lambda self: os.getpid()})).remote()\n"
            "print('MODE', os.environ.get('RAY_AUTH_MODE'), 'ACTOR', ray.get(actor.pid.remote(), timeout=60))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and "MODE None ACTOR " in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.mark.xdist_group("open_cluster")
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --mount` and mount (root, as in CI)")
def test_a_worker_that_shares_no_disk(open_cluster, tmp_path, slower_folder):
    """A worker node as a second machine is (`open_cluster`). A search that would checkpoint where the worker
    cannot share refuses before it starts; with a shared --storage it runs trials on both nodes, and the
    worker builds its decoded cache where the driver's TUNE_SOTA_CACHE says."""
    c = open_cluster
    results, cache, shared, env, head, worker, nodes = (c.results, c.cache, tmp_path / "shared", c.env, c.head,
                                                        c.worker, c.nodes)

    data = slower_folder
    space = write_space(tmp_path / "apart.yaml", tiny(data, size=32, presize=32, epochs=12),
                        {"num_samples": 4, "max_concurrent": 2, "cpus_per_trial": 1, "confirm_top": 0})
    t0 = time.time()
    run = run_cli(env, "search", "--space", space, "--address", head, "--results", results, timeout=300)
    assert_one_line_error(run, "the default --storage, the results folder", "is not shared by the cluster's nodes",
                          "give --storage a folder every node sees")
    assert time.time() - t0 < 120 and not (results / "apart").exists(), "refused before anything ran"
    check = run_cli(env, "cluster-check", "--address", head, "--storage", results, timeout=300)
    assert check.returncode == 1 and "NOT shared with the other nodes" in check.stdout, check.stdout

    run = run_cli(env, "search", "--space", space, "--address", head, "--storage", shared, "--results", results)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = load_trials(results / "apart")
    assert len(trials) == 4 and set(trials.status) == {"completed"} and trials.node.nunique() == 2, trials
    # What the worker sees, through its processes' root: its cache where the driver said, none under its HOME.
    seen = Path(f"/proc/{next(p for p in nodes.mine() if os.getpgid(p) == worker)}/root")
    assert list((seen / str(cache).lstrip("/")).glob("decoded/*/train/train.json")), "the worker built no cache there"
    assert not (seen / str(c.root / "w" / ".cache" / "tune_sota").lstrip("/")).exists()
    assert not list((seen / str(results).lstrip("/")).iterdir()), "the worker's own results folder stays empty"


@pytest.fixture
def s3(tmp_path):
    """A local S3 (moto's server on 127.0.0.1) with one bucket, and the environment that points at it:
    pyarrow, which Ray's storage goes through, reads the endpoint from AWS_ENDPOINT_URL."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < end and server.poll() is None, "moto's server did not start"
                time.sleep(0.3)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="tune")
        yield env, client
    finally:
        server.terminate()
        server.wait(30)


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="tune", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_s3_storage_keeps_checkpoints_in_the_bucket_and_resumes_after_a_killed_driver(s3, tmp_path, ray_tmp):
    """The README's `--storage s3://...`, tested: a search on S3 (a local moto server), its driver killed with
    its local Ray mid-search, resumed from what the bucket holds, finished."""
    env, client = s3
    env = {**os.environ, **env, "RAY_TMPDIR": str(ray_tmp), "PYTHONWARNINGS": "ignore"}
    data = make_image_folder(tmp_path / "data", per_class=(40, 6), px=24)
    space = write_space(tmp_path / "ons3.yaml", {**tiny(data, epochs=3), "lr": {"loguniform": [1e-3, 1e-2]}},
                        {"num_samples": 3, "max_concurrent": 1, "cpus_per_trial": 1, "scheduler": "fifo",
                         "confirm_top": 0, "checkpoint_every": 1})
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "tune_sota.cli", "search", "--space", str(space), "--results",
                             str(results), "--storage", "s3://tune/searches"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        end = time.time() + 400
        while not any("/checkpoint_" in k for k in _keys(client, "searches/ons3/")):
            assert time.time() < end and proc.poll() is None, proc.stdout.read()[-3000:] if proc.poll() else "timeout"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, 9)  # the driver and its local Ray, as a lost machine would
        proc.wait(60)
    assert not (results / "ons3" / "trials.csv").exists(), "killed mid-search"

    run = subprocess.run([sys.executable, "-m", "tune_sota.cli", "search", "--resume", "ons3", "--results",
                          str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = load_trials(results / "ons3")
    assert len(trials) == 3 and set(trials.status) == {"completed"} and trials.lr.is_unique, trials
    keys = _keys(client, "searches/ons3/")
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in keys), keys[:20]
    best = {k.split("/")[2] for k in keys if "/checkpoint_" in k and k.endswith("state.pt")}
    assert best, "the trials' checkpoints are in the bucket"
    assert not list((results / "ons3").glob("trial_*/checkpoint_*")), "and not on the driver's disk"
