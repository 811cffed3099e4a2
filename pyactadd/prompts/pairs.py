"""Contrast pairs: the prompts many-pair extraction steers towards and away from.

A pairs file is JSONL, one ``{"positive": "...", "negative": "..."}`` object a line
(repeng's ``DatasetEntry`` fields); blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pyactadd.errors import InputError
from pyactadd.prompts.files import read_text_lines


@dataclass(frozen=True)
class Pair:
    """One contrast pair: steer towards ``positive``, away from ``negative``."""

    positive: str
    negative: str


def load_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a JSONL file with one ``{"positive": ..., "negative": ...}`` object per line.

    Blank lines are skipped. Raises:
        InputError: a missing or unreadable file, a line that is not such an object (the
            message names the line), or no pairs at all.
    """
    file = Path(path)
    lines = read_text_lines(
        file,
        what="pairs file",
        expected="a .jsonl file of prompt pairs",
        when_empty='holds no pairs: write lines like {"positive": "Love", "negative": "Hate"}',
    )
    pairs = []
    for number, line in lines:
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{file} line {number} is not JSON ({exc.msg}): write one object per line") from None
        except RecursionError:
            # json's C decoder counts its depth against the recursion limit and stops safely.
            raise InputError(f"{file} line {number} nests JSON too deeply: write one flat object per line") from None
        if not isinstance(item, dict):
            raise InputError(
                f"{file} line {number} must be an object {{\"positive\": ..., \"negative\": ...}}, got {type(item).__name__}"
            )
        pairs.append(checked_pair(item, f"{file} line {number}"))
    return pairs


def checked_pair(item: object, where: str) -> Pair:
    """``item`` (a :class:`Pair`, a ``(positive, negative)`` tuple or list, or a dict) as a Pair.

    Raises:
        InputError: another shape, other keys, or a prompt that is not a non-empty string
            (the message starts with ``where``).
    """
    if isinstance(item, Pair):
        positive, negative = item.positive, item.negative
    elif isinstance(item, dict):
        unknown = set(item) - {"positive", "negative"}
        if unknown or len(item) != 2:
            raise InputError(f"{where} must have exactly the keys \"positive\" and \"negative\", got {sorted(item)}")
        positive, negative = item["positive"], item["negative"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        positive, negative = item
    else:
        raise InputError(f"{where} must be {{\"positive\": ..., \"negative\": ...}}, got {type(item).__name__}")
    for name, text in (("positive", positive), ("negative", negative)):
        if not isinstance(text, str) or not text:
            raise InputError(f"{where}: {name} must be a non-empty string, got {text!r}")
    return Pair(positive, negative)
