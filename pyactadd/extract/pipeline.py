"""ActAdd extraction: a prompt pair -> per-layer, per-position steering rows (the PyTorch stage).

For each layer ``L`` the steering tensor is ``coeff * (h_pos - h_neg)``, where ``h`` is
the residual stream entering block ``L`` at every prompt position (Turner et al. 2023).
Both prompts are tokenized exactly as llama.cpp will tokenize at inference, the anchor
token (if any) is put first in both, and the shorter prompt is right-padded with the pad
token so both have ``P`` positions. Row ``p`` is meant for prompt position ``p``
(``alignment="front"``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pyactadd.default_model import resolve_model
from pyactadd.errors import InputError
from pyactadd.vector.layers import check_layer
from pyactadd.prompts.tokens import Tokenizer, apply_anchor, fingerprint_of, resolve_anchor
from pyactadd.vector.value import SteeringVector

SINK_RATIO = 10.0
"""A row is an outlier when its norm exceeds this many times the typical residual norm at its block."""

REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back into the quiet forest."
"""Ordinary text run alongside the prompts so short prompts still have a typical residual norm to compare with."""


class SinkRowWarning(UserWarning):
    """A steering row sits on an attention-sink position and would mostly add the sink's huge activation."""


@dataclass(frozen=True)
class _Outlier:
    layer: int
    position: int
    norm: float  # the larger of the two prompts' residual norms, or the difference's norm if that is larger
    what: str  # "residual" or "difference"
    typical: float


def prepare_model(layers, model, pad: str, anchor: str | None):
    """Everything extraction needs before PyTorch loads, checked against the model's metadata.

    Returns ``(layers, model_path, fingerprint, tokenizer, pad_id, anchor_id)``: the layer
    list (each valid for the model), the resolved model file, its fingerprint, the
    llama.cpp-equivalent tokenizer, and the pad and anchor token ids (anchor None: none).

    Raises:
        InputError: a layer out of range, a pad text that is not one token, an unknown anchor.
    """
    wanted = _as_layer_list(layers)
    model_path = resolve_model(model)
    tokenizer = Tokenizer.from_model(model_path)
    fingerprint = fingerprint_of(model_path)
    if fingerprint.n_layer is not None:
        for layer in wanted:
            check_layer(layer, fingerprint.n_layer)
    pad_id = tokenizer.single_token(pad, "pad")
    anchor_id = resolve_anchor(tokenizer, anchor)
    return wanted, model_path, fingerprint, tokenizer, pad_id, anchor_id


def extract(
    positive: str,
    negative: str,
    layers: int | Sequence[int],
    *,
    coeff: float = 1.0,
    model: str | os.PathLike[str] | None = None,
    pad: str = " ",
    anchor: str = "none",
    zero_rows: Sequence[int] = (),
    zero_outliers: bool = False,
    progress: bool = False,
) -> SteeringVector:
    """Extract an ActAdd steering vector ``coeff * (h_pos - h_neg)`` for each layer in ``layers``.

    Args:
        positive: the prompt to steer towards, e.g. ``"Love"``.
        negative: the prompt to steer away from, e.g. ``"Hate"``.
        layers: block-input layer(s) ``L`` (``1 .. n_layer - 1``, see :mod:`pyactadd.vector.layers`).
        coeff: finite number multiplied into the rows.
        model: GGUF file or Hugging Face model directory; ``None`` for the default SmolLM2.
        pad: single-token text that right-pads the shorter prompt.
        anchor: ``"none"``, ``"bos"`` or a single token's text (e.g. ``"<|im_start|>"``)
            put first in both prompts; its row is then exactly zero and the prompts' content
            starts at position 1, away from the position-0 attention sink.
        zero_rows: positions whose rows are set to zero in every layer.
        zero_outliers: zero the rows that trigger :class:`SinkRowWarning` instead of warning.
        progress: print a line to stderr when a GGUF model is converted (its first use).

    Returns:
        A :class:`SteeringVector` with float32 rows ``[P, n_embd]`` per layer; the same
        inputs give identical arrays.

    Warns:
        SinkRowWarning: a row at layer ``L`` has a prompt residual or a difference more than
            ``SINK_RATIO`` times the typical residual norm at that block (an attention-sink
            position), unless zeroed by ``zero_rows`` or ``zero_outliers``.

    Raises:
        InputError: an empty prompt, a layer out of range, a non-finite ``coeff``, a pad
            or anchor that is not one token, a zero row out of range, or a missing model.
    """
    from pyactadd.extract.activations import record_block_inputs
    from pyactadd.extract.torch_model import load_torch_model, model_n_embd, model_n_layer

    # Cheap checks first: loading the torch model can take a minute.
    coeff = _checked_coeff(coeff)
    for name, text in (("positive", positive), ("negative", negative)):
        if not isinstance(text, str):
            raise InputError(f"{name} prompt must be text, got {type(text).__name__}")
        if not text:
            raise InputError(f"empty {name} prompt: give a non-empty text")
    wanted, model_path, fingerprint, tokenizer, pad_id, anchor_id = prepare_model(layers, model, pad, anchor)
    positive_ids = apply_anchor(tokenizer.encode(positive), anchor_id)
    negative_ids = apply_anchor(tokenizer.encode(negative), anchor_id)
    n_positions = max(len(positive_ids), len(negative_ids))
    rows_to_zero = _checked_rows(zero_rows, n_positions)

    torch_model = load_torch_model(model_path, progress=progress)
    n_layer = model_n_layer(torch_model)
    for layer in wanted:
        check_layer(layer, n_layer)
    if model_n_embd(torch_model) != fingerprint.n_embd or n_layer != (fingerprint.n_layer or n_layer):
        raise InputError(
            f"transformers loaded {model_path.name} with n_embd {model_n_embd(torch_model)} and {n_layer} blocks "
            f"but its metadata says {fingerprint.describe()}: this model is not supported for extraction"
        )

    batch = [_right_pad(positive_ids, n_positions, pad_id), _right_pad(negative_ids, n_positions, pad_id)]
    residuals = record_block_inputs(torch_model, batch, wanted)
    reference_ids = apply_anchor(tokenizer.encode(REFERENCE_TEXT), anchor_id)
    reference = record_block_inputs(torch_model, [reference_ids], wanted)

    steering: dict[int, np.ndarray] = {}
    outliers: list[_Outlier] = []
    for layer in wanted:
        h_pos, h_neg = residuals[layer][0], residuals[layer][1]
        difference = h_pos - h_neg
        steering[layer] = np.ascontiguousarray(np.float32(coeff) * difference, dtype=np.float32)
        outliers += _find_outliers(layer, h_pos, h_neg, difference, reference[layer][0], batch)

    zeroed: dict[int, set[int]] = {layer: set(rows_to_zero) for layer in wanted}
    if zero_outliers:
        for outlier in outliers:
            zeroed[outlier.layer].add(outlier.position)
    for layer, rows in zeroed.items():
        if rows:
            steering[layer][sorted(rows)] = 0.0
    _warn_about(
        [o for o in outliers if o.position not in zeroed[o.layer]], batch, tokenizer, anchor_id, stacklevel=3
    )

    extra: dict[str, object] = {}
    if any(zeroed.values()):
        extra["zeroed_rows"] = json.dumps({str(layer): sorted(rows) for layer, rows in zeroed.items() if rows})
    return SteeringVector(
        layers=steering,
        fingerprint=fingerprint,
        alignment="front",
        coefficient=coeff,
        positive=positive,
        negative=negative,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
        anchor=anchor,
        anchor_id=anchor_id,
        pad_id=pad_id,
        model_hint=fingerprint.architecture,
        extra=extra,
    )


def _checked_coeff(coeff: object) -> float:
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real) or not math.isfinite(float(coeff)):
        raise InputError(f"coefficient must be a finite number, got {coeff!r}")
    return float(coeff)


def _as_layer_list(layers: int | Sequence[int]) -> list[int]:
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


def _checked_rows(rows: Sequence[int], n_positions: int) -> list[int]:
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


def _right_pad(ids: list[int], length: int, pad_id: int) -> list[int]:
    return ids + [pad_id] * (length - len(ids))


def _find_outliers(
    layer: int,
    h_pos: np.ndarray,
    h_neg: np.ndarray,
    difference: np.ndarray,
    h_reference: np.ndarray,
    batch: list[list[int]],
) -> list[_Outlier]:
    """Rows whose prompt residual or difference is far above the block's typical residual norm.

    The typical norm is the median residual norm over every position except 0 of both
    prompts and the reference text: position 0 (the anchor, or the first token) is an
    attention sink in nearly every model, and the median shrugs off the few other sinks.
    """
    pos_norms = np.linalg.norm(h_pos.astype(np.float64), axis=1)
    neg_norms = np.linalg.norm(h_neg.astype(np.float64), axis=1)
    diff_norms = np.linalg.norm(difference.astype(np.float64), axis=1)
    ref_norms = np.linalg.norm(h_reference.astype(np.float64), axis=1)
    typical = float(np.median(np.concatenate([pos_norms[1:], neg_norms[1:], ref_norms[1:]])))
    outliers = []
    for position in range(h_pos.shape[0]):
        # Identical token prefixes give identical residuals: the row is zero, nothing to warn about.
        if batch[0][: position + 1] == batch[1][: position + 1]:
            continue
        residual = max(pos_norms[position], neg_norms[position])
        norm, what = (residual, "residual") if residual >= diff_norms[position] else (diff_norms[position], "difference")
        if norm > SINK_RATIO * typical:
            outliers.append(_Outlier(layer, position, float(norm), what, typical))
    return outliers


def _warn_about(
    outliers: list[_Outlier], batch: list[list[int]], tokenizer: Tokenizer, anchor_id: int | None, stacklevel: int
) -> None:
    by_layer: dict[int, list[_Outlier]] = {}
    for outlier in outliers:
        by_layer.setdefault(outlier.layer, []).append(outlier)
    for layer, found in by_layer.items():
        where = ", ".join(
            f"position {o.position} ({o.what} norm {o.norm:.0f}, {o.norm / o.typical:.0f}x the typical {o.typical:.0f})"
            for o in found
        )
        reasons = sorted({_sink_reason(o.position, batch, tokenizer, anchor_id) for o in found})
        fixes = []
        if any(o.position == 0 for o in found) and anchor_id is None and tokenizer.bos_id is not None:
            bos_text = tokenizer.decode([tokenizer.bos_id])
            fixes.append(f"pass anchor={bos_text!r} (--anchor {bos_text!r}) so both prompts start with the same token")
        fixes.append("zero_outliers=True (--zero-outliers) to zero these rows")
        warnings.warn(
            f"layer {layer}: steering row at {where} is an outlier: {'; '.join(reasons)}, so the row mostly "
            f"carries the sink's huge activation rather than the prompts' difference; {', or '.join(fixes)}",
            SinkRowWarning,
            stacklevel=stacklevel,
        )


def _sink_reason(position: int, batch: list[list[int]], tokenizer: Tokenizer, anchor_id: int | None) -> str:
    if position == 0 and anchor_id is None and not tokenizer.adds_bos:
        return "position 0 without a BOS token is an attention sink"
    texts = {tokenizer.decode([ids[position]]) for ids in batch}
    if any(text.strip() == "" for text in texts):
        return f"position {position} holds a lone whitespace token, which acts as an attention sink"
    return f"position {position} looks like an attention sink"
