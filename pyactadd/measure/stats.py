"""Statistics for behavioural evaluation: success rates, paired tests and intervals (numpy only).

The three conditions of ``pyactadd eval --task ...`` (unsteered, steered, prompted) are
generated from the same prompts with the same seeds, so completion ``i`` of one condition
is paired with completion ``i`` of another. The tests here use that pairing:

* a success rate gets a 95 % Wilson score interval (good coverage even at 0 or n successes);
* a difference between two conditions gets a two-sided paired permutation (sign-flip) test:
  under the null hypothesis the two members of each pair are exchangeable, so every pair's
  difference is as likely to have either sign. For 0/1 outcomes the sign-flip distribution
  of the summed difference is exactly a binomial over the discordant pairs (McNemar's exact
  test), computed in closed form; other values are enumerated exactly up to
  :data:`EXACT_MAX_PAIRS` non-zero pairs, else sampled with a seeded generator;
* a disfluency mean or median gets a seeded percentile-bootstrap interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pyactadd.errors import InputError

Z_95 = 1.959963984540054
"""The standard normal quantile for a two-sided 95 % interval."""

EXACT_MAX_PAIRS = 16
"""Non-zero paired differences up to which a permutation test enumerates all 2^m sign patterns."""

DEFAULT_RESAMPLES = 20000
"""Random sign patterns (permutation test) or resamples (bootstrap) beyond exact enumeration."""


@dataclass(frozen=True)
class Interval:
    """An estimate with its lower and upper bound."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Interval:
    """The success rate ``successes / n`` with its Wilson score interval (95 % by default).

    Raises:
        InputError: ``n < 1`` or ``successes`` outside ``0..n``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise InputError(f"a success rate needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes one bound is the rate itself; the formula gets it only up to rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high)


def binomial_two_sided(k: int, m: int) -> float:
    """Two-sided p-value of ``k`` heads in ``m`` fair coin flips: P(|X - m/2| >= |k - m/2|)."""
    if m == 0:
        return 1.0
    far = abs(k - m / 2)
    # Exact integers: a tail of a few hundred flips is below float64's resolution of 2**-m otherwise.
    extreme = sum(math.comb(m, j) for j in range(m + 1) if abs(j - m / 2) >= far)
    return min(1.0, extreme / 2**m)


def paired_permutation_pvalue(
    x: Sequence[float], y: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> float:
    """Two-sided paired permutation (sign-flip) p-value for ``mean(x - y) == 0``.

    0/1 outcomes: exact (binomial over the discordant pairs, McNemar's exact test). Other
    values: every sign pattern when at most :data:`EXACT_MAX_PAIRS` differences are non-zero,
    else ``n_resamples`` random patterns from ``seed``, counted as ``(hits + 1) / (n + 1)``.

    Raises:
        InputError: ``x`` and ``y`` differ in length or are empty.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise InputError(f"a paired test needs two equally long non-empty samples, got {a.shape} and {b.shape}")
    d = a - b
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    if np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b, (0.0, 1.0))):
        return binomial_two_sided(int(np.sum(d > 0)), int(d.size))
    observed = abs(d.sum())
    tolerance = 1e-9 * np.abs(d).sum()
    if d.size <= EXACT_MAX_PAIRS:
        patterns = ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1
        sums = np.abs(patterns @ d)
        return float(np.mean(sums >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 4096):
        signs = rng.choice((-1.0, 1.0), size=(min(4096, n_resamples - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    return (hits + 1) / (n_resamples + 1)


def bootstrap_interval(
    values: Sequence[float], statistic: str = "mean", *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """``statistic`` ("mean" or "median") of ``values`` with a seeded percentile-bootstrap interval.

    Raises:
        InputError: no values, or an unknown statistic.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise InputError("an interval needs at least one value")
    functions = {"mean": np.mean, "median": np.median}
    if statistic not in functions:
        raise InputError(f"unknown statistic {statistic!r}: use mean or median")
    function = functions[statistic]
    rng = np.random.default_rng(seed)
    resampled = function(data[rng.integers(0, data.size, size=(n_resamples, data.size))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Interval(float(function(data)), float(low), float(high))
