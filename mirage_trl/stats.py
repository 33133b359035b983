"""Statistics for reported accuracies: Wilson intervals, exact McNemar tests, paired bootstrap intervals.

Accuracies on a few hundred held-out rows move by several points between seeds and subsets, so
every figure the experiment reports carries an interval, and every difference between two
decodings of the *same* rows (an ablation against the model's own latents, Mirage against
text-only SFT) is tested as a paired difference: McNemar's exact test on the discordant rows, and
a percentile bootstrap interval for the accuracy difference (rows resampled with their pairs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (correct / n); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of paired outcomes: a binomial test on the discordant pairs.

    Returns b_only (b right, a wrong), a_only, and the p-value (1.0 when no pair is discordant)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same rows: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    low = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def paired_bootstrap(
    a: Sequence[bool], b: Sequence[bool], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean difference b - a, low, high): percentile interval of the accuracy difference, rows resampled
    in pairs with a fixed seed."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same rows: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return 0.0, 0.0, 0.0
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    rng = random.Random(seed)
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int((1 - level) / 2 * resamples)]
    hi = stats[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return sum(diffs) / n, lo, hi


def compare(a: Sequence[bool], b: Sequence[bool], seed: int = 0) -> dict:
    """Everything the report says about b against a on the same rows."""
    delta, lo, hi = paired_bootstrap(a, b, seed=seed)
    return {"delta": delta, "ci95": [lo, hi], **mcnemar_exact(a, b)}
