"""Checking extraction's arguments, before any model loads (loading is the slow part)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from pyactadd.errors import InputError


def checked_coeff(coeff: object) -> float:
    """``coeff`` as a float.

    Raises:
        InputError: not a finite real number (booleans included).
    """
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real) or not math.isfinite(float(coeff)):
        raise InputError(f"coefficient must be a finite number, got {coeff!r}")
    return float(coeff)


def checked_layers(layers: int | Sequence[int]) -> list[int]:
    """One layer or several as a sorted list without repeats (not yet checked against a model).

    Raises:
        InputError: not an integer or a non-empty list of integers.
    """
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return [int(layers)]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputError(f"layers must be an integer or a list of integers, got {layers!r}")
    items = list(layers)  # type: ignore[arg-type]
    if not items:
        raise InputError("no layers given: pass at least one block-input layer, e.g. layers=6")
    checked = []
    for item in items:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            checked.append(int(item))
        else:
            raise InputError(f"layer must be an integer, got {item!r}")
    return sorted(set(checked))


def checked_rows(rows: Sequence[int], n_positions: int) -> list[int]:
    """Positions to zero, sorted without repeats.

    Raises:
        InputError: not a list of integers, or a position outside ``0 .. n_positions - 1``.
    """
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise InputError(f"zero_rows must be a list of positions, got {rows!r}")
    checked = []
    for row in rows:
        if isinstance(row, bool) or not isinstance(row, numbers.Integral):
            raise InputError(f"zero row must be an integer position, got {row!r}")
        if not 0 <= row < n_positions:
            raise InputError(
                f"zero row {row} is out of range: the prompts have {n_positions} positions (0 to {n_positions - 1})"
            )
        checked.append(int(row))
    return sorted(set(checked))


def checked_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int.

    Raises:
        InputError: not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def checked_prompt(name: str, text: object) -> str:
    """A prompt of a single pair, named ``positive`` or ``negative`` in the message.

    Raises:
        InputError: not text, or empty.
    """
    if not isinstance(text, str):
        raise InputError(f"{name} prompt must be text, got {type(text).__name__}")
    if not text:
        raise InputError(f"empty {name} prompt: give a non-empty text")
    return text
