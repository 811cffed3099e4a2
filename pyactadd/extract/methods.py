"""Steering maths: pair activations -> one steering row (or one row per position) per layer.

Pure numpy, no model: :mod:`pyactadd.extract.pipeline` records the activations and calls
these through :data:`METHODS`, the registry of methods by name (a new method is one
:class:`Method` entry). Inputs are float32 ``[n_pairs, n_embd]`` (one row per prompt,
read at its last token) or per-position differences; arithmetic is float64; results are
float32.

* :func:`mean_difference`: mean of ``positive - negative`` (contrastive activation
  addition, Rimsky et al. 2024; steering-vectors' ``mean_aggregator``; llama.cpp's
  ``cvector-generator --method mean`` before it unit-normalises).
* :func:`pca_direction`: the first principal component ``u`` of the differences, scaled
  to the mean difference's length along it: the result is ``(mean_difference . u) u``, the
  mean difference's component on ``u``. That fixes the sign too: whatever sign the SVD
  gives ``u``, the result points the way the positive prompts lie from the negative ones
  on average (the mean difference projects positively on it). Uncentered by default
  (the top right singular vector of the difference matrix: steering-vectors'
  ``pca_aggregator`` and cvector-generator's PCA); ``center=True``
  subtracts the mean difference first, as repeng's ``pca_diff`` (sklearn's PCA) does.
* :func:`actadd_mean`: ActAdd's per-position rows averaged over pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pyactadd.errors import InputError

POSITIONS = "positions"
"""A method reads every position: prompts right-padded to one length with real pad tokens, no mask."""

LAST_TOKENS = "last tokens"
"""A method reads each prompt at its last real token: prompts padded within a batch and masked."""


def _pairs(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    positive = np.asarray(positive)
    negative = np.asarray(negative)
    if positive.ndim != 2 or positive.shape != negative.shape or positive.shape[0] < 1:
        raise InputError(
            f"positive and negative activations must both be [n_pairs, n_embd] with n_pairs >= 1, "
            f"got {list(positive.shape)} and {list(negative.shape)}"
        )
    return positive.astype(np.float64) - negative.astype(np.float64)


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Mean over pairs of ``positive - negative``: ``[n, d]`` twice -> float32 ``[d]``."""
    return _pairs(positive, negative).mean(axis=0).astype(np.float32)


def pca_direction(positive: np.ndarray, negative: np.ndarray, *, center: bool = False) -> tuple[np.ndarray, float]:
    """First principal component of the pair differences, signed and scaled (see the module docstring).

    Returns:
        ``(vector, explained)``: float32 ``[d]``, and the fraction of the (centered or
        uncentered) sum of squares the component explains.

    Raises:
        InputError: every difference is zero (nothing to find), or ``center`` with a
            single pair (centering leaves nothing).
    """
    differences = _pairs(positive, negative)
    mean = differences.mean(axis=0)
    if center and differences.shape[0] < 2:
        raise InputError("centered PCA needs at least two pairs: add pairs or use the uncentered PCA")
    data = differences - mean if center else differences
    if not np.any(data):
        raise InputError("the positive and negative prompts give identical activations: PCA has no direction to find")
    _, singular, vt = np.linalg.svd(data, full_matrices=False)
    component = vt[0]
    # (mean . u) u is the same vector for u and -u: the sign needs no convention, and the
    # result always has the mean difference projecting positively on it ((mean . u)^2 >= 0).
    along = float(mean @ component)
    explained = float(singular[0] ** 2 / np.sum(singular**2))
    return (along * component).astype(np.float32), explained


def actadd_mean(difference_sum: np.ndarray, n_pairs: int) -> np.ndarray:
    """Per-position ActAdd rows averaged over pairs: a float64 sum ``[P, d]`` of float32 differences / ``n_pairs``."""
    if n_pairs < 1:
        raise InputError("actadd needs at least one pair")
    return (np.asarray(difference_sum, dtype=np.float64) / n_pairs).astype(np.float32)


Rows = tuple[np.ndarray, "float | None"]
"""What a method makes of one layer: float32 rows ``[P, d]`` or ``[1, d]``, and the PCA's explained fraction."""


@dataclass(frozen=True)
class Method:
    """One way to turn the recorded activations of many pairs into steering rows.

    ``aggregate(recorded, n_pairs, center)`` gets one layer's recording: for ``POSITIONS``
    the float64 sum ``[P, d]`` of the pairs' per-position differences, for
    ``LAST_TOKENS`` the last-token rows ``[2 n_pairs, d]`` (pair i's positive prompt at
    row ``2i``, its negative at ``2i + 1``).
    """

    name: str
    reads: str
    alignment: str
    aggregate: Callable[[np.ndarray, int, bool], Rows]
    metadata: Callable[[bool, dict[int, float]], dict[str, object]] = lambda center, explained: {}
    """What the method adds to the file's ``extra``, from ``center`` and the explained fractions by layer."""


def _actadd(recorded: np.ndarray, n_pairs: int, center: bool) -> Rows:
    return actadd_mean(recorded, n_pairs), None


def _mean(recorded: np.ndarray, n_pairs: int, center: bool) -> Rows:
    return mean_difference(recorded[0::2], recorded[1::2]).reshape(1, -1), None


def _pca(recorded: np.ndarray, n_pairs: int, center: bool) -> Rows:
    row, explained = pca_direction(recorded[0::2], recorded[1::2], center=center)
    return row.reshape(1, -1), explained


def _pca_metadata(center: bool, explained: dict[int, float]) -> dict[str, object]:
    return {
        "pca_center": bool(center),
        "pca_scale": "mean difference projected on the component",
        "pca_explained": json.dumps({str(layer): round(value, 6) for layer, value in explained.items()}),
    }


METHODS: dict[str, Method] = {
    "actadd": Method("actadd", POSITIONS, "front", _actadd),
    "mean": Method("mean", LAST_TOKENS, "all", _mean),
    "pca": Method("pca", LAST_TOKENS, "all", _pca, _pca_metadata),
}
"""The extraction methods by name (``pyactadd extract --method``)."""
