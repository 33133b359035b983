"""Statistics of the experiment report against plain, independent computations."""

from __future__ import annotations

import itertools
import math

import pytest

from mirage_trl.stats import compare, mcnemar_exact, paired_bootstrap, wilson_interval


@pytest.mark.parametrize(
    "correct,n,low,high",
    [
        (8, 10, 0.4901625, 0.9433178),
        (0, 20, 0.0, 0.1611252),
        (50, 50, 0.9286524, 1.0),
        (30, 100, 0.2189489, 0.3958485),
    ],
)
def test_wilson_interval_known_values(correct, n, low, high):
    """Reference values: the Wilson score formula evaluated independently (statsmodels' proportion_confint
    method="wilson" gives the same digits)."""
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=1e-6) and hi == pytest.approx(high, abs=1e-6)


def _mcnemar_by_enumeration(a_only: int, b_only: int) -> float:
    """Two-sided exact p by enumerating every assignment of the discordant pairs (fair coin under H0)."""
    n = a_only + b_only
    observed = abs(a_only - n / 2)
    extreme = sum(1 for flips in itertools.product((0, 1), repeat=n) if abs(sum(flips) - n / 2) >= observed)
    return extreme / 2**n


@pytest.mark.parametrize("a_only,b_only", [(0, 5), (3, 7), (4, 4), (1, 9), (0, 0)])
def test_mcnemar_exact_equals_enumeration(a_only, b_only):
    both, neither = 6, 3
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    got = mcnemar_exact(a, b)
    assert (got["a_only"], got["b_only"]) == (a_only, b_only)
    expected = _mcnemar_by_enumeration(a_only, b_only) if a_only + b_only else 1.0
    assert got["p_value"] == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_is_seeded_and_brackets_the_difference():
    a = [i % 3 == 0 for i in range(90)]
    b = [i % 2 == 0 for i in range(90)]
    delta, lo, hi = paired_bootstrap(a, b, seed=1)
    assert delta == pytest.approx(sum(map(int, b)) / 90 - sum(map(int, a)) / 90)
    assert lo <= delta <= hi and hi - lo > 0
    assert paired_bootstrap(a, b, seed=1) == (delta, lo, hi)
    # identical decodings: no difference, a zero-width interval, p = 1
    same = compare(a, a)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_unpaired_lengths_are_refused():
    with pytest.raises(ValueError, match="same rows"):
        mcnemar_exact([True], [True, False])
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap([True], [])


def test_wilson_is_the_formula():
    z = 1.959963984540054
    for correct, n in [(1, 3), (17, 40)]:
        p = correct / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson_interval(correct, n) == pytest.approx((centre - half, centre + half))
