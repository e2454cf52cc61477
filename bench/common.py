"""What every benchmark shares: where the shared Imagenette is, the machine it ran on, the markdown
table it prints, and the section it appends to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "imagenette2-128"
RESULTS = BENCH / "RESULTS.md"


def shared_data(path: str | None = None) -> Path:
    """The Imagenette copy to measure on; exit with a clear message when it is not there."""
    p = Path(path).expanduser() if path else SHARED_DATA
    if not (p / "train").is_dir() or not (p / "val").is_dir():
        where = f"{p}" if path else f"../shared/data/imagenette2-128 (looked in {p})"
        sys.exit(f"{Path(sys.argv[0]).name}: no Imagenette at {where}. This benchmark measures the shared 128 px "
                 f"Imagenette copy that sits beside the project (see ../shared/data/README.md); put it there, or "
                 f"pass --data PATH to a folder with train/ and val/.")
    return p


def machine() -> str:
    """CPU model and cores, memory, GPU, and the library versions that set the speed."""
    import fastai
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; {gpu}; python {platform.python_version()}, "
            f"torch {torch.__version__}, fastai {fastai.__version__}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats get sensible digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, body: str, results: Path = RESULTS) -> str:
    """Append one benchmark's section (title, date, command, machine, `body`) to RESULTS.md; return it."""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = f"\n## {title}, {when}\n\n`{command()}`\n\nMachine: {machine()}\n\n{body.strip()}\n"
    if not results.exists():
        results.write_text("# Benchmark records\n\nEach section is appended by the script named in it.\n")
    with open(results, "a") as fh:
        fh.write(section)
    return section
