"""Attention sinks: steering rows that would mostly add a sink's huge activation.

Nearly every model parks a huge residual on a few positions: position 0 (the anchor, or
the prompt's own first token) above all, and often lone whitespace tokens. A steering
row read at such a position carries the sink's activation rather than the prompts'
difference. The one rule, for every extraction method and for the evaluation:

* the typical norm at a block is the median residual norm over every position except 0
  of every prompt the model ran (unmasked padding included) and of :data:`REFERENCE_TEXT`
  (the median shrugs off the few sinks among them);
* a row is an outlier when the norm behind it (the larger prompt residual at its
  position, or the pair's difference if that is larger) is more than :data:`SINK_RATIO`
  times the typical norm; for the last-token methods, when a prompt's last-token
  residual is;
* position 0 is a sink whenever the prompt itself starts there (no anchor, no BOS).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pyactadd.prompts.tokens import Tokenizer
    from pyactadd.vector.value import SteeringVector

SINK_RATIO = 10.0
"""A row is an outlier when its norm exceeds this many times the typical residual norm at its block."""

REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back into the quiet forest."
"""Ordinary text run alongside the prompts so short prompts still have a typical residual norm to compare with."""


class SinkRowWarning(UserWarning):
    """A steering row sits on an attention-sink position and would mostly add the sink's huge activation."""


@dataclass(frozen=True)
class Outlier:
    """A steering row over the limit: where, how large, and the tokens there (positive, negative)."""

    layer: int
    position: int
    norm: float
    what: str  # "residual" or "difference": which norm was the larger
    typical: float
    tokens: tuple[int, int]


def first_position_is_sink(anchor_id: int | None, adds_bos: bool) -> bool:
    """True when position 0 holds the prompt's own first token (no anchor, no BOS): an attention sink."""
    return anchor_id is None and not adds_bos


def _norms(rows: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rows.astype(np.float64), axis=-1)


class SinkCheck:
    """Residual norms seen while recording, and the rows and last tokens over the limit.

    Args:
        reference: ``{L: [1, T, n_embd]}``, the block inputs of :data:`REFERENCE_TEXT`.
    """

    def __init__(self, reference: dict[int, np.ndarray]) -> None:
        self._samples = {layer: [_norms(rows[0])[1:]] for layer, rows in reference.items()}
        self._rows: dict[int, dict[int, tuple[float, str, tuple[int, int]]]] = {layer: {} for layer in reference}
        self._last: list[tuple[int, int, int, float, float]] = []  # layer, pair, position, norm, typical

    def add_prompts(self, layer: int, h: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
        """Count positions ``1 .. length - 1`` of each prompt's residuals ``h`` ``[n, T, d]``; returns their norms."""
        norms = _norms(h)
        for row, length in enumerate(lengths):
            self._samples[layer].append(norms[row, 1:length])
        return norms

    def add_pair_rows(self, layer: int, h: np.ndarray, batch: Sequence[Sequence[int]]) -> None:
        """Residuals ``[2n, P, d]`` of n pairs run unmasked; ``batch`` the padded ids, positive then negative."""
        norms = self.add_prompts(layer, h, [h.shape[1]] * h.shape[0])
        differences = _norms(h[0::2] - h[1::2])
        best = self._rows[layer]
        for pair in range(h.shape[0] // 2):
            positive, negative = batch[2 * pair], batch[2 * pair + 1]
            for position in range(h.shape[1]):
                # Identical token prefixes give identical residuals: the row is zero, nothing to warn about.
                if positive[: position + 1] == negative[: position + 1]:
                    continue
                residual = max(norms[2 * pair, position], norms[2 * pair + 1, position])
                difference = differences[pair, position]
                norm, what = (residual, "residual") if residual >= difference else (difference, "difference")
                if norm > best.get(position, (0.0,))[0]:
                    best[position] = (float(norm), what, (positive[position], negative[position]))

    def typical(self, layer: int) -> float:
        """The median residual norm at ``layer`` over everything counted so far."""
        values = np.concatenate(self._samples[layer])
        return float(np.median(values)) if values.size else math.inf

    def row_outliers(self) -> list[Outlier]:
        """The per-position rows over the limit, by layer, then position."""
        found = []
        for layer, best in self._rows.items():
            typical = self.typical(layer)
            for position, (norm, what, tokens) in sorted(best.items()):
                if norm > SINK_RATIO * typical:
                    found.append(Outlier(layer, position, norm, what, typical, tokens))
        return found

    def check_last_tokens(self, layer: int, last: np.ndarray, ids: Sequence[tuple[list[int], list[int]]]) -> None:
        """Note the prompts whose last-token residual (``last`` ``[2n, d]``, positive then negative) is over the limit."""
        typical = self.typical(layer)
        for row, norm in enumerate(_norms(last)):
            if norm > SINK_RATIO * typical:
                pair, side = divmod(row, 2)
                self._last.append((layer, pair, len(ids[pair][side]) - 1, float(norm), typical))

    def warn_last_tokens(self, tokenizer: Tokenizer, anchor_id: int | None, *, stacklevel: int) -> None:
        """One :class:`SinkRowWarning` per layer with last tokens over the limit."""
        by_layer: dict[int, list[tuple[int, int, float, float]]] = {}
        for layer, pair, position, norm, typical in self._last:
            by_layer.setdefault(layer, []).append((pair, position, norm, typical))
        for layer, found in by_layer.items():
            pairs = sorted({pair for pair, *_ in found})
            _, position, norm, typical = found[0]
            shown = ", ".join(str(p) for p in pairs[:8]) + (", …" if len(pairs) > 8 else "")
            fixes = _anchor_fix(position == 0, anchor_id, tokenizer, "every prompt starts") + ["use longer prompts"]
            warnings.warn(
                f"layer {layer}: the last token of pair(s) {shown} sits on an attention sink (residual norm "
                f"{norm:.0f}, {norm / typical:.0f}x the typical {typical:.0f}), so the difference "
                f"mostly carries the sink; {', or '.join(fixes)}",
                SinkRowWarning,
                stacklevel=stacklevel + 1,
            )


def warn_rows(
    outliers: Sequence[Outlier], tokenizer: Tokenizer, anchor_id: int | None, *, n_pairs: int, stacklevel: int
) -> None:
    """One :class:`SinkRowWarning` per layer with per-position rows over the limit.

    ``stacklevel`` is what the caller would pass to :func:`warnings.warn` itself.
    """
    by_layer: dict[int, list[Outlier]] = {}
    for outlier in outliers:
        by_layer.setdefault(outlier.layer, []).append(outlier)
    row, prompts = ("steering row", "both prompts start") if n_pairs == 1 else ("the averaged row", "every prompt starts")
    for layer, found in by_layer.items():
        where = ", ".join(
            f"position {o.position} ({o.what} norm {o.norm:.0f}, {o.norm / o.typical:.0f}x the typical {o.typical:.0f})"
            for o in found
        )
        reasons = sorted({_reason(o, tokenizer, anchor_id) for o in found})
        fixes = _anchor_fix(any(o.position == 0 for o in found), anchor_id, tokenizer, prompts)
        fixes.append("zero_outliers=True (--zero-outliers) to zero these rows")
        warnings.warn(
            f"layer {layer}: {row} at {where} is an outlier: {'; '.join(reasons)}, so the row mostly "
            f"carries the sink's huge activation rather than the prompts' difference; {', or '.join(fixes)}",
            SinkRowWarning,
            stacklevel=stacklevel + 1,
        )


def warn_row0_on_sink(
    vectors: Sequence[tuple[SteeringVector, float]], anchor_id: int | None, adds_bos: bool, *, stacklevel: int
) -> None:
    """Warn when a front-aligned vector's non-zero row 0 will land on each text's own first token.

    Nothing to warn about when the texts start with an anchor or the model adds a BOS.
    ``stacklevel`` is what the caller would pass to :func:`warnings.warn` itself.
    """
    if not first_position_is_sink(anchor_id, adds_bos):
        return
    for vector, coeff in vectors:
        if vector.alignment == "front" and coeff != 0 and any(np.any(rows[0] != 0) for rows in vector.layers.values()):
            warnings.warn(
                "the vector has no anchor and a non-zero row 0, which lands on each sentence's first token: this model "
                "adds no BOS, so that position is an attention sink and the row mostly disturbs it; extract with "
                "--anchor bos (or --zero-row 0)",
                SinkRowWarning,
                stacklevel=stacklevel + 1,
            )
            return


def _reason(outlier: Outlier, tokenizer: Tokenizer, anchor_id: int | None) -> str:
    position = outlier.position
    if position == 0 and first_position_is_sink(anchor_id, tokenizer.adds_bos):
        return "position 0 without a BOS token is an attention sink"
    texts = {tokenizer.decode([token]) for token in outlier.tokens}
    if any(text.strip() == "" for text in texts):
        return f"position {position} holds a lone whitespace token, which acts as an attention sink"
    return f"position {position} looks like an attention sink"


def _anchor_fix(at_position_0: bool, anchor_id: int | None, tokenizer: Tokenizer, prompts: str) -> list[str]:
    """The anchor suggestion (a list of zero or one fix) for a sink at position 0 that a shared BOS would move."""
    if not at_position_0 or anchor_id is not None or tokenizer.bos_id is None:
        return []
    bos = tokenizer.decode([tokenizer.bos_id])
    return [f"pass anchor={bos!r} (--anchor {bos!r}) so {prompts} with the same token"]
