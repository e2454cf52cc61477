"""The cluster code paths that tests/test_cluster.py reaches only as root (a worker node in a mount namespace
of its own), run without root: the environment every trial's worker gets from the driver, and the refusal
of a --storage the nodes do not share. Real Ray: two nodes on this machine (Ray's own `cluster_utils`),
the second with an environment of its own, as a `ray start` node on another machine has."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tune_sota import cluster


def test_the_forwarded_environment_is_the_data_and_cache_variables_and_quiet_warnings():
    environ = {"TUNE_SOTA_CACHE": "/c", "TUNE_SOTA_ANYTHING": "x", "FASTAI_HOME": "/f", "HOME": "/h",
               "PATH": "/bin", "RAY_ADDRESS": "1.2.3.4:6379", "AWS_SECRET_ACCESS_KEY": "s"}
    assert cluster.forwarded_env(environ) == {
        "TUNE_SOTA_CACHE": "/c", "TUNE_SOTA_ANYTHING": "x", "FASTAI_HOME": "/f",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    assert set(cluster.forwarded_env({})) == {"PYTHONWARNINGS"}


# Run in a child process: it starts and joins its own Ray (nothing of it outlives the test), with the
# environment it is given.
TWO_NODES = r"""
import json, os, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tune_sota import cluster
from tune_sota.config import UserError

tmp = Path(sys.argv[1])
nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
# the second node's own environment: its raylet, and so its workers, would keep the cache elsewhere
nodes.add_node(num_cpus=1, env_vars={"TUNE_SOTA_CACHE": "/the/nodes/own", "FASTAI_HOME": "/the/nodes/fastai"})
out = {}
try:
    cluster.connect(nodes.address)
    head = ray.get_runtime_context().get_node_id()
    other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
    seen = ray.remote(num_cpus=0)(lambda: {k: os.environ.get(k) for k in (
        "TUNE_SOTA_CACHE", "TUNE_SOTA_PROBE", "FASTAI_HOME", "PYTHONWARNINGS", "NOT_FORWARDED")})
    out["env"] = ray.get(seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False)).remote(),
                         timeout=120)
    shared = tmp / "shared"
    out["unshared"] = [r.node_id for r in cluster.unshared(str(shared))]
    out["left"] = sorted(p.name for p in shared.iterdir()) if shared.is_dir() else None  # markers removed
    (tmp / "a-file").write_text("not a folder\n")
    try:
        cluster.check_storage(str(tmp / "a-file" / "storage"), default=False)
        out["refused"] = None
    except UserError as e:
        out["refused"] = str(e)
    out["ray_after_refusal"] = ray.is_initialized()
finally:
    ray.shutdown()
    nodes.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """What a driver joined to a two-node Ray saw (see TWO_NODES)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_SOTA_"))}
    ray_tmp = Path(tempfile.mkdtemp(prefix="tcu-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env.update(TUNE_SOTA_CACHE=str(tmp / "driver-cache"), TUNE_SOTA_PROBE="from the driver",
               FASTAI_HOME=str(tmp / "driver-fastai"), PYTHONWARNINGS="default", NOT_FORWARDED="here only",
               RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    try:
        run = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp, json.loads(line[0][len("RESULT "):])


def test_a_node_with_its_own_environment_gets_the_drivers_data_and_cache_variables(two_nodes):
    tmp, seen = two_nodes
    env = seen["env"]
    assert env["TUNE_SOTA_CACHE"] == str(tmp / "driver-cache"), env  # not the node's /the/nodes/own
    assert env["FASTAI_HOME"] == str(tmp / "driver-fastai") and env["TUNE_SOTA_PROBE"] == "from the driver"
    assert env["PYTHONWARNINGS"] == "ignore::FutureWarning,ignore::DeprecationWarning"  # the driver's is "default"


def test_a_storage_the_nodes_cannot_all_write_is_refused_in_one_line_and_ray_let_go(two_nodes):
    tmp, seen = two_nodes
    assert seen["unshared"] == [] and seen["left"] == []  # one folder both nodes see: shared, markers removed
    refused = seen["refused"]
    assert refused and "\n" not in refused, refused
    assert refused.startswith(f"--storage {tmp / 'a-file' / 'storage'} is not shared by the cluster's nodes (node ")
    assert "NotADirectoryError" in refused or "FileExistsError" in refused, refused
    assert "give --storage a folder every node sees (NFS) or s3://bucket/path" in refused
    assert seen["ray_after_refusal"] is False  # nothing left joined once refused


def test_the_node_probe_finds_what_each_view_of_a_storage_holds(tmp_path):
    """The tasks `cluster-check` and the storage refusal run on each node, called here as plain functions:
    two views of one path (two machines' local folders) each hold only their own node's marker."""
    probe, sees, remove = cluster._node_task()
    here, there = tmp_path / "here", tmp_path / "there"
    (tmp_path / "data" / "train").mkdir(parents=True)
    for view, node in ((here, "n1"), (there, "n2")):
        found = probe(str(view), f".mark-{node}", [str(tmp_path / "data"), str(tmp_path / "none")])
        assert found["storage"] == "" and found["tune_sota"]
        assert found["data"] == {str(tmp_path / "data"): "", str(tmp_path / "none"): f"no {tmp_path / 'none'}"}
    assert sees(str(here), ".mark-") == ["n1"] and sees(str(there), ".mark-") == ["n2"]
    remove(str(here), [".mark-n1"])
    assert sees(str(here), ".mark-") == [] and sees(str(there), ".mark-") == ["n2"]
    (tmp_path / "file").write_text("x")
    assert probe(str(tmp_path / "file" / "sub"), ".mark-n1", [])["storage"]  # cannot be written: says why


def test_cluster_check_names_a_node_that_does_not_see_the_others_or_cannot_write():
    import platform

    import ray

    from tune_sota import __version__

    def node(nid, sees=(), storage=""):
        return cluster.NodeReport(nid, f"10.0.0.{nid[-1]}", 1, 0, ray=ray.__version__,
                                  python=platform.python_version(), tune_sota=__version__, storage=storage,
                                  sees=set(sees))

    ids = ("node0001", "node0002")
    assert cluster.problems([node(n, ids) for n in ids], "/shared") == []
    lines = cluster.problems([node("node0001", ids), node("node0002", ["node0002"])], "/local")
    assert lines == ["node node0002 (10.0.0.2): does not see what other nodes write to --storage /local; it must be "
                     "one shared folder (NFS or similar) or s3://"]
    lines = cluster.problems([node("node0001", ids), node("node0002", storage="PermissionError: denied")], "/x")
    assert lines == ["node node0002 (10.0.0.2): cannot write --storage /x (PermissionError: denied)"]

