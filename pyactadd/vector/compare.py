"""How close two steering files for the same pair are: per layer, per row (numpy only).

Made for the question "does a float32 vector transfer to the quantized model?": extract
the same pair with ``--backend torch`` and ``--backend llama`` and compare. For every
layer both files hold, each row's cosine, both norms and their ratio (second / first),
the minimum and mean row cosine, and the cosine of the whole ``[P, n_embd]`` tensor.
Rows that are zero in either file (an anchor's row, a zeroed row) have no cosine and
count in neither the minimum nor the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pyactadd.errors import InputError
from pyactadd.vector.value import SteeringVector

__all__ = ["compare_vectors"]


def compare_vectors(first: SteeringVector, second: SteeringVector) -> dict[str, Any]:
    """Per-layer, per-row comparison of ``second`` against ``first``, as plain data.

    Returns:
        ``{"layers": [{"layer", "rows": [{"row", "cosine", "norm_first", "norm_second",
        "norm_ratio"}], "min_cosine", "mean_cosine", "cosine"}], "min_cosine",
        "mean_cosine", "only_in_first", "only_in_second", "notes"}``; cosines and ratios
        are None where a row is zero.

    Raises:
        InputError: the files have different row widths, or no layer in common.
    """
    if first.n_embd != second.n_embd:
        raise InputError(
            f"the files have rows of width {first.n_embd} and {second.n_embd}: compare files made for the same model"
        )
    common = sorted(set(first.layer_ids) & set(second.layer_ids))
    if not common:
        raise InputError(
            f"the files have no layer in common ({first.layer_ids} and {second.layer_ids}): extract both at the same -l"
        )
    notes = []
    if first.n_positions != second.n_positions:
        notes.append(
            f"the files have {first.n_positions} and {second.n_positions} rows per layer: the first "
            f"{min(first.n_positions, second.n_positions)} are compared (the same pair gives the same count)"
        )
    layers = [_layer(layer, first.layers[layer], second.layers[layer]) for layer in common]
    cosines = [row["cosine"] for entry in layers for row in entry["rows"] if row["cosine"] is not None]
    return {
        "layers": layers,
        "min_cosine": min(cosines) if cosines else None,
        "mean_cosine": float(np.mean(cosines)) if cosines else None,
        "only_in_first": sorted(set(first.layer_ids) - set(common)),
        "only_in_second": sorted(set(second.layer_ids) - set(common)),
        "notes": notes,
    }


def _layer(layer: int, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    n = min(a.shape[0], b.shape[0])
    a64, b64 = a[:n].astype(np.float64), b[:n].astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    rows = []
    for i in range(n):
        nonzero = norm_a[i] > 0 and norm_b[i] > 0
        rows.append(
            {
                "row": i,
                "cosine": float(a64[i] @ b64[i] / (norm_a[i] * norm_b[i])) if nonzero else None,
                "norm_first": float(norm_a[i]),
                "norm_second": float(norm_b[i]),
                "norm_ratio": float(norm_b[i] / norm_a[i]) if nonzero else None,
            }
        )
    cosines = [row["cosine"] for row in rows if row["cosine"] is not None]
    whole_a, whole_b = np.linalg.norm(a64), np.linalg.norm(b64)
    return {
        "layer": layer,
        "rows": rows,
        "min_cosine": min(cosines) if cosines else None,
        "mean_cosine": float(np.mean(cosines)) if cosines else None,
        "cosine": float(np.sum(a64 * b64) / (whole_a * whole_b)) if whole_a > 0 and whole_b > 0 else None,
    }
