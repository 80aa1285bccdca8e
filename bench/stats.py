"""Intervals for the benchmarks' ratios and rates, and the words a report uses for them.

Every ratio the benchmarks report (paired speed-ups, layout overhead, allocator on/off, compile vs
eager, bf16 vs float32, flush-to-zero off/on, scaling) comes with a 95% percentile-bootstrap
interval of its median: over the per-pair ratios where the two sides were timed in alternation,
else over both sides' repeats resampled independently (the ratio of their medians). A ratio whose
interval contains 1 is "no measurable difference on this machine", neither a win nor a loss.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence

LEVEL = 0.95
DRAWS = 2000
NO_DIFFERENCE = "no measurable difference"
TOO_FEW = "too few repeats"


def _quantiles(draws: list[float], level: float) -> tuple[float, float]:
    draws = sorted(draws)
    tail = (1 - level) / 2
    return draws[int(tail * len(draws))], draws[math.ceil((1 - tail) * len(draws)) - 1]


def interval(ratios: Sequence[float], *, level: float = LEVEL, draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``ratios`` (paired repeats); NaN for one repeat."""
    ratios = list(ratios)
    if not ratios:
        raise ValueError("interval() needs at least one ratio")
    if len(ratios) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    return _quantiles([statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws)], level)


def ratio_interval(a: Sequence[float], b: Sequence[float], *, level: float = LEVEL, draws: int = DRAWS,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(a) / median(b) for independent repeats ``a`` and ``b``."""
    a, b = list(a), list(b)
    if not a or not b:
        raise ValueError("ratio_interval() needs repeats on both sides")
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    return _quantiles([statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                       for _ in range(draws)], level)


def verdict(lo: float, hi: float, *, above: str, below: str) -> str:
    """``above`` when the interval lies above 1, ``below`` when below, else no measurable difference
    (too few repeats for an interval: NaN bounds)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return TOO_FEW
    if lo > 1:
        return above
    if hi < 1:
        return below
    return NO_DIFFERENCE


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    xs = list(xs)
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def summarize(ratios: Sequence[float], prefix: str) -> dict:
    """The columns of one paired ratio: ``{prefix}`` (median), ``_q1``, ``_q3``, ``_lo``, ``_hi`` (95%)."""
    q1, q3 = quartiles(ratios)
    lo, hi = interval(ratios)
    return {prefix: statistics.median(ratios), f"{prefix}_q1": q1, f"{prefix}_q3": q3,
            f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def encode_rounds(seconds: Sequence[float]) -> str:
    """Repeats as a CSV cell: JSON milliseconds (what ``decode_rounds`` reads back)."""
    return json.dumps([round(s * 1e3, 4) for s in seconds])


def decode_rounds(cell) -> list[float] | None:
    """Milliseconds from an ``encode_rounds`` cell; None for an empty cell (older reports)."""
    if not isinstance(cell, str) or not cell.startswith("["):
        return None
    return [float(x) for x in json.loads(cell)]
