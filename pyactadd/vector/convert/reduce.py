"""Reducing a per-position vector (``[P, n_embd]`` per layer) to the one row llama.cpp adds everywhere.

Stock llama.cpp adds one vector per layer at every position, so a per-position pyactadd
file must be reduced explicitly; which reduction makes sense depends on the file:

* ``row:K`` keeps row ``K`` (negative ``K`` counts from the end: ``row:-1`` is the last
  row, the prompt's last token for ``back`` alignment). Values are copied exactly.
* ``mean`` averages the rows (accumulated in float64).
* ``sum`` adds them: the total push the per-position file gives over its span.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from pyactadd.errors import InputError
from pyactadd.vector.value import SteeringVector

_ROW = re.compile(r"row:(-?\d+)")


@dataclass(frozen=True)
class Reduction:
    """A parsed ``--reduce`` value."""

    kind: str  # "row", "mean" or "sum"
    row: int | None = None

    def __str__(self) -> str:
        return f"row:{self.row}" if self.kind == "row" else self.kind


def parse_reduction(text: object) -> Reduction:
    """Parse ``row:K``, ``mean`` or ``sum``.

    Raises:
        InputError: anything else, naming the three forms.
    """
    if isinstance(text, Reduction):
        return text
    value = str(text).strip().lower()
    if value in ("mean", "sum"):
        return Reduction(value)
    match = _ROW.fullmatch(value)
    if match:
        return Reduction("row", int(match.group(1)))
    raise InputError(f"unknown reduction {text!r}: use row:K (keep row K, e.g. row:0 or row:-1), mean or sum")


def reduce_vector(vector: SteeringVector, reduction: Reduction | str) -> SteeringVector:
    """Return a one-row-per-layer copy of ``vector`` with alignment ``"all"`` (llama.cpp's meaning).

    Raises:
        InputError: ``row:K`` outside the vector's rows.
    """
    how = parse_reduction(reduction)
    n_positions = vector.n_positions
    if how.kind == "row" and not -n_positions <= how.row < n_positions:  # type: ignore[operator]
        raise InputError(
            f"row {how.row} does not exist: the vector has {n_positions} rows "
            f"(row:0 .. row:{n_positions - 1}, or row:-1 for the last)"
        )
    layers = {}
    for layer, rows in vector.layers.items():
        if how.kind == "row":
            reduced = rows[how.row].copy()
        elif how.kind == "mean":
            reduced = rows.astype(np.float64).mean(axis=0)
        else:
            reduced = rows.astype(np.float64).sum(axis=0)
        layers[layer] = np.ascontiguousarray(reduced, dtype=np.float32).reshape(1, -1)
    extra = dict(vector.extra)
    if n_positions > 1:
        extra["reduced_from"] = f"{how} of {n_positions} {vector.alignment}-aligned rows"
    return dataclasses.replace(vector, layers=layers, alignment="all", extra=extra)
