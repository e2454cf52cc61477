"""What a user installs: the wheel carries the shipped search spaces, the version is the installed one, and the
package's modules import one another without a circle."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version

import pytest

from tests.conftest import ROOT
from tune_sota import __version__
from tune_sota.config import SPACES_DIR


def test_version_comes_from_the_installed_metadata():
    assert __version__ == version("tune_sota")


def package_imports(package=ROOT / "tune_sota") -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, at the top or inside a function."""
    mods = {p.stem for p in package.glob("*.py")}
    graph = {}
    for m in mods:
        found = set()
        for node in ast.walk(ast.parse((package / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "tune_sota":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tune_sota."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tune_sota.")}
        graph[m] = (found & mods) - {m}
    return graph


def test_the_package_has_no_import_circle():
    """A circle (config <-> sources was one) means neither module can be read or tested below the other."""
    graph = package_imports()
    assert graph["config"] >= {"sources", "base"} and "config" not in graph["sources"]
    state: dict[str, str] = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import circle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.slow
def test_wheel_ships_the_spaces_and_finds_them_installed(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tune_sota", "search_spaces"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    tmp_path / "dist", src], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("tune_sota-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"tune_sota/search_spaces/{p.name}" for p in SPACES_DIR.glob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what installing the wheel puts in site-packages
    probe = "from tune_sota.config import load_space; print(load_space('quick').source)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, check=True).stdout.strip()
    assert out.startswith(str(target)), out
