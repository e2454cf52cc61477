"""startup: what the search driver imports before it can print its first line. Fresh Python processes,
side by side in one run: the driver's imports now (`tune_sota.search`, which names the trainables
but leaves torch and fastai to the trial) against the driver's imports before 5e90e0b (the same plus
`tune_sota.recipe`, which brings torch and fastai, as the old trainable.py and versions() did).
Ratio = before / now. Needs no data.

    python bench/startup.py             # 5 runs of each, interleaved; the median is reported
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import ROOT, record, table

SIDES = {
    "now: import tune_sota.search": "import tune_sota.search",
    "before 5e90e0b: + tune_sota.recipe (torch, fastai)": "import tune_sota.search, tune_sota.recipe",
}
PROBE = "{imports}; import sys; print('torch' in sys.modules, 'fastai' in sys.modules)"


def once(imports: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return time.perf_counter() - t0, run.stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--runs", type=int, default=5, help="runs of each side, interleaved")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()

    for imports in SIDES.values():  # warm the file cache: the first process of all reads every .py from disk
        once(imports)
    times, loaded = {k: [] for k in SIDES}, {}
    for _ in range(args.runs):
        for side, imports in SIDES.items():
            s, flags = once(imports)
            times[side].append(s)
            loaded[side] = flags
    now, before = (statistics.median(times[k]) for k in SIDES)
    rows = [[side, statistics.median(t), min(t), max(t), loaded[side].replace(" ", " / ")]
            for side, t in times.items()]
    body = (table(["driver imports", "median s", "min s", "max s", "torch / fastai imported"], rows)
            + f"\n\n- {args.runs} fresh processes per side, interleaved, after one warm-up each"
            + f"\n\nstart-up ratio: {before / now:.1f}x (before over now)")
    print(body)
    if not args.no_record:
        record("startup: the search driver's imports, now and before 5e90e0b", body)


if __name__ == "__main__":
    main()
