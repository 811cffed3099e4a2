"""Many-pair extraction: a JSONL file of prompt pairs -> one steering vector (the PyTorch stage).

Each line of the pairs file is ``{"positive": "...", "negative": "..."}`` (repeng's
``DatasetEntry`` fields). Prompts are tokenized exactly as llama.cpp tokenizes them at
inference (see :mod:`pyactadd.prompts.tokens`), the anchor is put first when one is chosen, and
prompts go through the model in batches (``batch_size`` pairs, both prompts of a pair in
the same batch) with a progress bar. Three methods (the maths is in :mod:`pyactadd.extract.methods`):

* ``actadd``: every prompt is right-padded with the pad token to the longest prompt of the
  whole set (pads are real tokens, as in single-pair ActAdd; no mask); the per-position
  differences are averaged over pairs. One pair gives exactly :func:`pyactadd.extract`'s
  rows. Alignment ``front``.
* ``mean``: prompts are right-padded within a batch and masked out with an attention
  mask; each prompt is read at its last real token (whose causal context is never the
  padding), and the differences are averaged. One row per layer, alignment ``all``.
* ``pca``: the same last-token activations; the first principal component of the
  differences, signed and scaled as :func:`pyactadd.extract.methods.pca_direction` says.
  Alignment ``all``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.pipeline import REFERENCE_TEXT, SINK_RATIO, SinkRowWarning, _checked_coeff, _checked_rows, prepare_model
from pyactadd.vector.layers import check_layer
from pyactadd.extract.methods import METHODS, actadd_mean, mean_difference, pca_direction
from pyactadd.prompts.tokens import Tokenizer, apply_anchor
from pyactadd.vector.value import SteeringVector

DEFAULT_BATCH_SIZE = 8


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
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no such pairs file: {file}") from None
    except IsADirectoryError:
        raise InputError(f"{file} is a directory: pass a .jsonl file of prompt pairs") from None
    except UnicodeDecodeError:
        raise InputError(f"{file} is not UTF-8 text: pass a .jsonl file of prompt pairs") from None
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror or exc}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{file} line {number} is not JSON ({exc.msg}): write one object per line") from None
        if not isinstance(item, dict):
            raise InputError(f"{file} line {number} must be an object {{\"positive\": ..., \"negative\": ...}}, got {type(item).__name__}")
        pairs.append(_as_pair(item, f"{file} line {number}"))
    if not pairs:
        raise InputError(f"{file} holds no pairs: write lines like {{\"positive\": \"Love\", \"negative\": \"Hate\"}}")
    return pairs


def _as_pair(item: object, where: str) -> Pair:
    if isinstance(item, Pair):
        positive, negative = item.positive, item.negative
    elif isinstance(item, dict):
        unknown = set(item) - {"positive", "negative"}
        if unknown or len(item) != 2:
            raise InputError(
                f"{where} must have exactly the keys \"positive\" and \"negative\", got {sorted(item)}"
            )
        positive, negative = item["positive"], item["negative"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        positive, negative = item
    else:
        raise InputError(f"{where} must be {{\"positive\": ..., \"negative\": ...}}, got {type(item).__name__}")
    for name, text in (("positive", positive), ("negative", negative)):
        if not isinstance(text, str) or not text:
            raise InputError(f"{where}: {name} must be a non-empty string, got {text!r}")
    return Pair(positive, negative)


def extract_pairs(
    pairs: Iterable[Pair | tuple[str, str] | dict],
    layers: int | Sequence[int],
    *,
    method: str = "actadd",
    coeff: float = 1.0,
    model: str | os.PathLike[str] | None = None,
    pad: str = " ",
    anchor: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    pca_center: bool = False,
    zero_rows: Sequence[int] = (),
    zero_outliers: bool = False,
    progress: bool = False,
) -> SteeringVector:
    """Extract one steering vector from many prompt pairs (see the module docstring for the methods).

    Args:
        pairs: :class:`Pair` objects, ``(positive, negative)`` tuples or dicts.
        layers: block-input layer(s) ``L``, all recorded in the same forward passes.
        method: ``"actadd"``, ``"mean"`` or ``"pca"``.
        coeff: finite number multiplied into the rows.
        model: GGUF file or Hugging Face directory; ``None`` for the default model.
        pad: single-token text that pads prompts (``actadd``: a real token; ``mean``/``pca``: masked).
        anchor: ``"none"``, ``"bos"`` or a single token put first in every prompt.
        batch_size: pairs per forward pass.
        pca_center: ``pca`` only: subtract the mean difference first (repeng's ``pca_diff``).
        zero_rows, zero_outliers: ``actadd`` only, as in :func:`pyactadd.extract`.
        progress: show a progress bar on stderr.

    Warns:
        SinkRowWarning: a row (``actadd``) or a last token (``mean``/``pca``) sits on an
            attention-sink position whose residual is far above the typical norm.

    Raises:
        InputError: no pairs, an empty prompt, an unknown method, a layer out of range,
            an option the method does not take, or a missing model.
    """
    from pyactadd.extract.activations import record_block_inputs

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    coeff = _checked_coeff(coeff)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    if method != "actadd" and (tuple(zero_rows) or zero_outliers):
        raise InputError(f"--zero-row and --zero-outliers apply to per-position rows (method actadd), not to {method}")
    if pca_center and method != "pca":
        raise InputError("--pca-center applies to method pca only")
    checked, wanted, model_path, fingerprint, tokenizer, pad_id, anchor_id, ids = _prepare(pairs, layers, model, pad, anchor)
    if method == "pca" and pca_center and len(checked) < 2:
        raise InputError("centered PCA needs at least two pairs: add pairs or drop --pca-center")
    n_positions = max(len(seq) for pair in ids for seq in pair)
    rows_to_zero = _checked_rows(zero_rows, n_positions) if method == "actadd" else []
    torch_model = _load(model_path, wanted, fingerprint, progress)
    reference_ids = apply_anchor(tokenizer.encode(REFERENCE_TEXT), anchor_id)
    reference = record_block_inputs(torch_model, [reference_ids], wanted)
    norms = _NormTracker(wanted, reference)

    bar = _progress_bar(len(checked), method, progress)
    try:
        if method == "actadd":
            sums = {layer: np.zeros((n_positions, fingerprint.n_embd), dtype=np.float64) for layer in wanted}
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                batch = [seq + [pad_id] * (n_positions - len(seq)) for pair in chunk for seq in pair]
                residuals = record_block_inputs(torch_model, batch, wanted)
                for layer in wanted:
                    h = residuals[layer]
                    sums[layer] += (h[0::2] - h[1::2]).astype(np.float64).sum(axis=0)
                    norms.add_sequences(layer, h, [len(seq) for pair in chunk for seq in pair], chunk, start)
                bar.update(len(chunk))
            steering = {layer: np.float32(coeff) * actadd_mean(sums[layer], len(ids)) for layer in wanted}
        else:
            last = _record_last_tokens(torch_model, ids, wanted, pad_id, batch_size, fingerprint.n_embd, bar, norms)
            steering = {}
            explained = {}
            for layer in wanted:
                positive, negative = last[layer][0::2], last[layer][1::2]
                if method == "mean":
                    row = mean_difference(positive, negative)
                else:
                    try:
                        row, explained[layer] = pca_direction(positive, negative, center=pca_center)
                    except InputError as exc:
                        raise InputError(f"layer {layer}: {exc}") from None
                steering[layer] = (np.float32(coeff) * row).reshape(1, -1)
                norms.check_last_tokens(layer, last[layer], ids)
    finally:
        bar.close()

    extra: dict[str, object] = {"method": method, "n_pairs": len(ids)}
    if method == "pca":
        extra["pca_center"] = bool(pca_center)
        extra["pca_scale"] = "mean difference projected on the component"
        extra["pca_explained"] = json.dumps({str(layer): round(value, 6) for layer, value in explained.items()})
    zeroed: dict[int, set[int]] = {layer: set(rows_to_zero) for layer in wanted}
    if method == "actadd":
        outliers = norms.row_outliers()
        if zero_outliers:
            for layer, position, _ in outliers:
                zeroed[layer].add(position)
        for layer, rows in zeroed.items():
            if rows:
                steering[layer][sorted(rows)] = 0.0
        if any(zeroed.values()):
            extra["zeroed_rows"] = json.dumps({str(layer): sorted(rows) for layer, rows in zeroed.items() if rows})
        norms.warn_rows([o for o in outliers if o[1] not in zeroed[o[0]]], anchor_id, tokenizer)
    else:
        norms.warn_last_tokens(anchor_id, tokenizer)
    single = checked[0] if len(checked) == 1 else None
    return SteeringVector(
        layers={layer: np.ascontiguousarray(rows, dtype=np.float32) for layer, rows in steering.items()},
        fingerprint=fingerprint,
        alignment="front" if method == "actadd" else "all",
        coefficient=coeff,
        positive=single.positive if single else None,
        negative=single.negative if single else None,
        positive_ids=ids[0][0] if single and method == "actadd" else None,
        negative_ids=ids[0][1] if single and method == "actadd" else None,
        anchor=anchor,
        anchor_id=anchor_id,
        pad_id=pad_id if method == "actadd" else None,
        model_hint=fingerprint.architecture,
        extra=extra,
    )


def last_token_activations(
    pairs: Iterable[Pair | tuple[str, str] | dict],
    layers: int | Sequence[int],
    *,
    model: str | os.PathLike[str] | None = None,
    pad: str = " ",
    anchor: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The residual stream entering each block in ``layers`` at every prompt's last token.

    Exactly what methods ``mean`` and ``pca`` work from (batched, right-padded, masked).

    Returns:
        ``{L: (positive, negative)}``, float32 arrays ``[n_pairs, n_embd]`` in pair order.

    Raises:
        InputError: as :func:`extract_pairs`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    checked, wanted, model_path, fingerprint, _, pad_id, _, ids = _prepare(pairs, layers, model, pad, anchor)
    torch_model = _load(model_path, wanted, fingerprint, progress)
    bar = _progress_bar(len(checked), "last tokens", progress)
    try:
        last = _record_last_tokens(torch_model, ids, wanted, pad_id, batch_size, fingerprint.n_embd, bar, None)
    finally:
        bar.close()
    return {layer: (rows[0::2].copy(), rows[1::2].copy()) for layer, rows in last.items()}


def _prepare(pairs, layers, model, pad, anchor):
    """Check pairs and layers, and tokenize every prompt as llama.cpp will (no torch yet)."""
    checked = [_as_pair(item, f"pair {index}") for index, item in enumerate(pairs)]
    if not checked:
        raise InputError("no pairs given: pass at least one (positive, negative) pair")
    wanted, model_path, fingerprint, tokenizer, pad_id, anchor_id = prepare_model(layers, model, pad, anchor)
    ids = [
        (apply_anchor(tokenizer.encode(p.positive), anchor_id), apply_anchor(tokenizer.encode(p.negative), anchor_id))
        for p in checked
    ]
    return checked, wanted, model_path, fingerprint, tokenizer, pad_id, anchor_id, ids


def _load(model_path, wanted, fingerprint, progress):
    """The PyTorch model, checked against the GGUF's own sizes."""
    from pyactadd.extract.torch_model import load_torch_model, model_n_embd, model_n_layer

    torch_model = load_torch_model(model_path, progress=progress)
    n_layer = model_n_layer(torch_model)
    for layer in wanted:
        check_layer(layer, n_layer)
    if model_n_embd(torch_model) != fingerprint.n_embd:
        raise InputError(
            f"the PyTorch model of {model_path.name} has n_embd {model_n_embd(torch_model)} but its metadata says "
            f"{fingerprint.describe()}: this model is not supported for extraction"
        )
    return torch_model


def _record_last_tokens(torch_model, ids, wanted, pad_id, batch_size, n_embd, bar, norms) -> dict[int, np.ndarray]:
    """Rows ``2i`` / ``2i + 1``: pair i's positive / negative prompt at its last real token."""
    from pyactadd.extract.activations import record_block_inputs

    last = {layer: np.zeros((2 * len(ids), n_embd), dtype=np.float32) for layer in wanted}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        sequences = [seq for pair in chunk for seq in pair]
        width = max(len(seq) for seq in sequences)
        batch = [seq + [pad_id] * (width - len(seq)) for seq in sequences]
        mask = [[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences]
        residuals = record_block_inputs(torch_model, batch, wanted, attention_mask=mask)
        for layer in wanted:
            h = residuals[layer]
            for row, seq in enumerate(sequences):
                last[layer][2 * start + row] = h[row, len(seq) - 1]
            if norms is not None:
                norms.add_sequences(layer, h, [len(seq) for seq in sequences], None, start)
        bar.update(len(chunk))
    return last


def _progress_bar(total: int, method: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc=f"{method}: forward passes", disable=not enabled, file=sys.stderr, leave=False)


class _NormTracker:
    """Residual norms seen while recording, to flag attention-sink rows (as :func:`pyactadd.extract` does).

    The typical norm at a block is the median residual norm over every real token except
    position 0 of every prompt and of a reference text; a row is an outlier when a prompt's
    residual at that position is more than ``SINK_RATIO`` times that.
    """

    def __init__(self, layers: list[int], reference: dict[int, np.ndarray]) -> None:
        self.samples = {layer: [np.linalg.norm(reference[layer][0, 1:].astype(np.float64), axis=1)] for layer in layers}
        self.max_row = {layer: {} for layer in layers}  # position -> (norm, pair index)
        self.last_norms = {layer: np.zeros(0) for layer in layers}
        self.last_flags: list[tuple[int, int, int, float, float]] = []

    def add_sequences(self, layer: int, h: np.ndarray, lengths: list[int], chunk, start: int) -> None:
        row_norms = np.linalg.norm(h.astype(np.float64), axis=2)
        for row, length in enumerate(lengths):
            self.samples[layer].append(row_norms[row, 1:length])
        if chunk is None:
            return
        best = self.max_row[layer]
        for pair_offset, (positive, negative) in enumerate(chunk):
            for position in range(row_norms.shape[1]):
                if positive[: position + 1] == negative[: position + 1]:
                    continue  # identical prefixes give identical residuals: the row is zero
                norm = max(row_norms[2 * pair_offset, position], row_norms[2 * pair_offset + 1, position])
                if norm > best.get(position, (0.0, -1))[0]:
                    best[position] = (float(norm), start + pair_offset)

    def typical(self, layer: int) -> float:
        values = np.concatenate(self.samples[layer])
        return float(np.median(values)) if values.size else math.inf

    def row_outliers(self) -> list[tuple[int, int, float]]:
        found = []
        for layer, best in self.max_row.items():
            typical = self.typical(layer)
            for position, (norm, _) in sorted(best.items()):
                if norm > SINK_RATIO * typical:
                    found.append((layer, position, norm))
        return found

    def warn_rows(self, outliers: list[tuple[int, int, float]], anchor_id: int | None, tokenizer: Tokenizer) -> None:
        by_layer: dict[int, list[tuple[int, float]]] = {}
        for layer, position, norm in outliers:
            by_layer.setdefault(layer, []).append((position, norm))
        for layer, found in by_layer.items():
            typical = self.typical(layer)
            where = ", ".join(f"position {p} (norm {n:.0f}, {n / typical:.0f}x the typical {typical:.0f})" for p, n in found)
            warnings.warn(
                f"layer {layer}: the averaged row at {where} comes from an attention-sink position, so it mostly carries "
                f"the sink's huge activation; {_sink_fix(found[0][0], anchor_id, tokenizer)}zero_outliers=True "
                "(--zero-outliers) to zero these rows",
                SinkRowWarning,
                stacklevel=3,
            )

    def check_last_tokens(self, layer: int, last: np.ndarray, ids) -> None:
        typical = self.typical(layer)
        norms = np.linalg.norm(last.astype(np.float64), axis=1)
        for row, norm in enumerate(norms):
            if norm > SINK_RATIO * typical:
                pair, which = divmod(row, 2)
                self.last_flags.append((layer, pair, len(ids[pair][which]) - 1, float(norm), typical))

    def warn_last_tokens(self, anchor_id: int | None, tokenizer: Tokenizer) -> None:
        by_layer: dict[int, list[tuple[int, int, float, float]]] = {}
        for layer, pair, position, norm, typical in self.last_flags:
            by_layer.setdefault(layer, []).append((pair, position, norm, typical))
        for layer, found in by_layer.items():
            pairs = sorted({pair for pair, *_ in found})
            position = found[0][1]
            shown = ", ".join(str(p) for p in pairs[:8]) + (", …" if len(pairs) > 8 else "")
            warnings.warn(
                f"layer {layer}: the last token of pair(s) {shown} sits on an attention sink (residual norm "
                f"{found[0][2]:.0f}, {found[0][2] / found[0][3]:.0f}x the typical {found[0][3]:.0f}), so the difference "
                f"mostly carries the sink; {_sink_fix(position, anchor_id, tokenizer)}use longer prompts",
                SinkRowWarning,
                stacklevel=3,
            )


def _sink_fix(position: int, anchor_id: int | None, tokenizer: Tokenizer) -> str:
    if position == 0 and anchor_id is None and tokenizer.bos_id is not None:
        bos = tokenizer.decode([tokenizer.bos_id])
        return f"pass anchor={bos!r} (--anchor {bos!r}) so every prompt starts with the same token, or "
    return ""
