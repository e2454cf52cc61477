"""Schedules as data. Progressive resizing: a schedule string becomes stages, and stages become epochs.
Early stopping: the shares of a one-cycle schedule at which ASHA's rungs sit (`rung_shares`).

`"64>96>128"` trains a third of the epochs at each size; `"64:2>128:1"` gives 64 px twice the
share of 128 px. The schedule is a string so that Optuna can choose between schedules as plain
categorical values.
"""

from __future__ import annotations

import math


def parse_schedule(text: str) -> list[tuple[int, float]]:
    """`"64:2>128:1"` -> [(64, 2/3), (128, 1/3)]; ValueError says what a schedule looks like."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a schedule like '64>96>128' or '64:2>128:1' (sizes ascending, ending at the final size)")
    stages = []
    for part in text.split(">"):
        size_s, _, share_s = part.strip().partition(":")
        try:
            size = int(size_s)
            share = float(share_s) if share_s else 1.0
        except ValueError:
            raise ValueError(f"stage '{part.strip()}' is not SIZE or SIZE:SHARE, e.g. '64>128' or '64:2>128:1'") \
                from None
        if size < 8 or not (share > 0 and math.isfinite(share)):
            raise ValueError(f"stage '{part.strip()}' needs a size >= 8 and a share > 0")
        stages.append((size, share))
    sizes = [s for s, _ in stages]
    if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must strictly increase (small images first), got {'>'.join(map(str, sizes))}")
    total = sum(share for _, share in stages)
    return [(s, share / total) for s, share in stages]


def epochs_per_stage(stages: list[tuple[int, float]], epochs: int) -> list[int]:
    """Whole epochs for each stage, summing to `epochs`.

    Every stage gets at least one epoch while there are enough; with fewer epochs than stages the
    earliest stages are dropped, because the final size must always be trained last.
    """
    n = len(stages)
    if epochs < n:
        return [0] * (n - epochs) + [1] * epochs
    raw = [share * epochs for _, share in stages]
    counts = [max(1, math.floor(r)) for r in raw]
    while sum(counts) > epochs:  # the minimum of one epoch overshot: take from the largest
        i = max(range(n), key=lambda j: (counts[j], -j))
        counts[i] -= 1
    while sum(counts) < epochs:  # hand out the rest by largest remainder, later stages on ties
        i = max(range(n), key=lambda j: (raw[j] - counts[j], j))
        counts[i] += 1
    return counts


def size_at_epoch(stages: list[tuple[int, float]], epochs: int, epoch: int) -> int:
    """The training image size of 0-based `epoch` in a run of `epochs`."""
    end = 0
    for (size, _), count in zip(stages, epochs_per_stage(stages, epochs)):
        end += count
        if epoch < end:
            return size
    return stages[-1][0]


def rung_shares(grace: float, reduction_factor: int) -> list[float]:
    """Rungs as shares of a schedule, ascending: 1/rf^k for k >= 1 down to `grace`; a grace above 1/rf is
    one rung at `grace` itself (the default 0.75: the recorded curves put the one rung there, issue 16)."""
    shares, k = [], 1
    while reduction_factor ** -k >= grace - 1e-9:
        shares.append(reduction_factor ** -k)
        k += 1
    return sorted(shares) or [grace]
