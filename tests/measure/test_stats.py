"""pyactadd.measure.stats on fixed inputs with known answers, and against direct enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pyactadd.errors import InputError
from pyactadd.measure.stats import (
    EXACT_MAX_PAIRS,
    binomial_two_sided,
    bootstrap_interval,
    paired_permutation_pvalue,
    wilson_interval,
)


def enumerated_pvalue(x, y) -> float:
    """The sign-flip p-value by brute force: every assignment of the pair members to the two samples."""
    d = [a - b for a, b in zip(x, y)]
    observed = abs(sum(d))
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        total += 1
        hits += abs(sum(s * v for s, v in zip(signs, d))) >= observed - 1e-12
    return hits / total


def test_wilson_interval_matches_published_values():
    half = wilson_interval(5, 10)
    assert half.value == 0.5
    assert half.low == pytest.approx(0.2366, abs=1e-4) and half.high == pytest.approx(0.7634, abs=1e-4)
    none = wilson_interval(0, 10)
    z2 = 1.959963984540054**2
    assert none.low == 0.0 and none.high == pytest.approx(z2 / (10 + z2), rel=1e-9)
    assert wilson_interval(10, 10).high == 1.0 and wilson_interval(10, 10).low == pytest.approx(1 - none.high, rel=1e-9)


@pytest.mark.parametrize("k, n", [(0, 0), (3, 2), (-1, 5)])
def test_wilson_interval_refuses_impossible_counts(k, n):
    with pytest.raises(InputError, match="success rate"):
        wilson_interval(k, n)


def test_binomial_two_sided_known_values():
    assert binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert binomial_two_sided(1, 5) == pytest.approx(12 / 32)
    assert binomial_two_sided(2, 4) == 1.0
    assert binomial_two_sided(0, 0) == 1.0
    # Far in the tail of many flips: exact integers, not float underflow to 0.
    assert binomial_two_sided(0, 600) == pytest.approx(2 * 0.5**600, rel=1e-9)


def test_binary_pvalue_equals_enumeration_and_mcnemar():
    x = [1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1]
    y = [0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    p = paired_permutation_pvalue(x, y)
    # 8 discordant pairs, 7 favour x: P(|B(8, .5) - 4| >= 3) = (1 + 8 + 8 + 1) / 256.
    assert p == pytest.approx(18 / 256, abs=1e-12)
    assert p == pytest.approx(enumerated_pvalue(x, y), abs=1e-12)
    assert paired_permutation_pvalue([1] * 8 + [0, 0], [0] * 10) == pytest.approx(2 / 256)
    assert paired_permutation_pvalue([1, 0, 1], [1, 0, 1]) == 1.0


def test_continuous_pvalue_exact_enumeration():
    rng = np.random.default_rng(3)
    x = rng.normal(0.4, 1.0, size=10)
    y = rng.normal(0.0, 1.0, size=10)
    assert paired_permutation_pvalue(x, y) == pytest.approx(enumerated_pvalue(x, y), abs=1e-12)


def test_continuous_pvalue_sampled_is_close_to_exact_and_seeded():
    rng = np.random.default_rng(5)
    m = EXACT_MAX_PAIRS + 4
    x, y = rng.normal(0.3, 1.0, size=m), rng.normal(0.0, 1.0, size=m)
    d = x - y
    patterns = ((np.arange(2**m)[:, None] >> np.arange(m)) & 1) * 2 - 1
    exact = float(np.mean(np.abs(patterns @ d) >= abs(d.sum()) - 1e-9))
    sampled = paired_permutation_pvalue(x, y, seed=1)
    assert sampled == pytest.approx(exact, abs=0.01)
    assert paired_permutation_pvalue(x, y, seed=1) == sampled


def test_pvalue_refuses_unpaired_samples():
    with pytest.raises(InputError, match="equally long"):
        paired_permutation_pvalue([1, 0], [1])
    with pytest.raises(InputError, match="equally long"):
        paired_permutation_pvalue([], [])


def test_bootstrap_interval_width_and_seed():
    rng = np.random.default_rng(0)
    values = rng.normal(20.0, 4.0, size=400)
    mean = bootstrap_interval(values, "mean", seed=0)
    assert mean.value == pytest.approx(float(np.mean(values)))
    expected_half = 1.96 * np.std(values) / math.sqrt(values.size)
    assert (mean.high - mean.low) / 2 == pytest.approx(expected_half, rel=0.15)
    assert mean.low < mean.value < mean.high
    assert bootstrap_interval(values, "mean", seed=0) == mean
    median = bootstrap_interval(values, "median", seed=0)
    assert median.value == pytest.approx(float(np.median(values)))
    assert median.low < median.value < median.high
    constant = bootstrap_interval([7.0] * 5, "median")
    assert (constant.value, constant.low, constant.high) == (7.0, 7.0, 7.0)


def test_bootstrap_interval_refuses_bad_input():
    with pytest.raises(InputError, match="at least one value"):
        bootstrap_interval([], "mean")
    with pytest.raises(InputError, match="unknown statistic"):
        bootstrap_interval([1.0], "mode")
