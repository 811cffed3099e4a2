"""ActAdd extraction: prompt pairs -> per-layer steering rows (the PyTorch stage).

One path for a single pair (:func:`extract`) and for many (:func:`pyactadd.extract.pairs.extract_pairs`):

1. :func:`prepare`: check the layers against the model's metadata and tokenize every
   prompt exactly as llama.cpp will at inference, the anchor token (if any) first (no
   torch yet);
2. :func:`record`: the residual stream entering each chosen block, read the way the
   method reads it (:mod:`pyactadd.extract.activations`), with the norms
   :mod:`pyactadd.extract.sinks` needs, from where :mod:`pyactadd.extract.sources` says:
   the whole PyTorch model (small llama files, Hugging Face directories) or the GGUF
   streamed one block at a time; the job's memory is checked from the header first;
4. aggregate with the method (:data:`pyactadd.extract.methods.METHODS`), multiply by the
   coefficient, zero the chosen rows, warn about attention-sink rows;
5. :func:`steering_vector`: the :class:`~pyactadd.vector.value.SteeringVector`.

For a single pair the rows are ``coeff * (h_pos - h_neg)`` at every prompt position
(Turner et al. 2023): the shorter prompt is right-padded with the pad token so both have
``P`` positions, and row ``p`` is meant for prompt position ``p`` (``alignment="front"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pyactadd.default_model import resolve_model
from pyactadd.errors import InputError
from pyactadd.extract.activations import Batch, pair_batches, record_pairs
from pyactadd.extract.gguf_tensors import read_model_header
from pyactadd.extract.llama_backend import TORCH, ExtractBackend, checked_backend, llama_block_inputs
from pyactadd.extract.methods import LAST_TOKENS, METHODS, POSITIONS, Method
from pyactadd.extract.options import checked_coeff, checked_layers, checked_prompt, checked_rows
from pyactadd.extract.sinks import REFERENCE_TEXT, SINK_RATIO, SinkCheck, SinkRowWarning, warn_rows
from pyactadd.extract.sources import open_block_inputs
from pyactadd.prompts.pairs import Pair
from pyactadd.prompts.tokens import Tokenizer, apply_anchor, fingerprint_of, resolve_anchor
from pyactadd.vector.layers import check_layer
from pyactadd.vector.value import ModelFingerprint, SteeringVector, check_coefficient, scaled_rows

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "REFERENCE_TEXT",
    "SINK_RATIO",
    "Prepared",
    "SinkRowWarning",
    "Steered",
    "extract",
    "prepare",
    "progress_bar",
    "record",
    "run_method",
    "steering_vector",
]

DEFAULT_BATCH_SIZE = 8
"""Pairs per forward pass."""

UNKNOWN_MODEL_CONTEXT = 2048
"""The context a prompt's rows are checked against when the model does not say how long a
context it was trained for: ``pyactadd run``'s default ``--n-ctx``."""

@dataclass(frozen=True)
class Prepared:
    """Prompts tokenized as llama.cpp will tokenize them, and the model they are for (no torch yet)."""

    pairs: list[Pair]
    layers: list[int]  # sorted, each valid for the model
    model_path: Path
    fingerprint: ModelFingerprint
    tokenizer: Tokenizer
    pad_id: int
    anchor: str  # as given: "none", "bos" or a token's text
    anchor_id: int | None
    ids: list[tuple[list[int], list[int]]]  # (positive, negative) of each pair, anchor first, unpadded

    @property
    def n_positions(self) -> int:
        """The longest prompt's length: the number of per-position rows."""
        return max(len(seq) for pair in self.ids for seq in pair)


@dataclass(frozen=True)
class Steered:
    """What :func:`run_method` made: the rows and what the file's ``extra`` will say about them."""

    rows: dict[int, np.ndarray]  # coefficient applied, chosen rows zeroed
    metadata: dict[str, object]  # the method's own keys
    zeroed: dict[int, list[int]]  # positions set to zero, for the layers that have any


def prepare(pairs: Sequence[Pair], layers: int | Sequence[int], model, pad: str, anchor: str) -> Prepared:
    """Everything extraction needs before PyTorch loads, checked against the model's metadata.

    Raises:
        InputError: a layer out of range, a pad text that is not one token, an unknown
            anchor, or a missing model.
    """
    wanted = checked_layers(layers)
    model_path = resolve_model(model)
    try:
        tokenizer = Tokenizer.from_model(model_path)
    except InputError:
        if not model_path.is_dir():
            read_model_header(model_path)  # a file cut short says so, rather than llama.cpp's "failed to load"
        raise
    fingerprint = fingerprint_of(model_path)
    if fingerprint.n_layer is not None:
        for layer in wanted:
            check_layer(layer, fingerprint.n_layer)
    pad_id = tokenizer.single_token(pad, "pad")
    anchor_id = resolve_anchor(tokenizer, anchor)
    ids = [
        (apply_anchor(tokenizer.encode(p.positive), anchor_id), apply_anchor(tokenizer.encode(p.negative), anchor_id))
        for p in pairs
    ]
    _check_lengths(ids, model_path, tokenizer)
    return Prepared(list(pairs), wanted, model_path, fingerprint, tokenizer, pad_id, anchor, anchor_id, ids)


def trained_context(model_path: Path, tokenizer: Tokenizer) -> int | None:
    """The context length the model was trained for (llama.cpp's ``n_ctx_train``), or None when it does not say.

    A GGUF file's ``<arch>.context_length``; a Hugging Face directory's ``max_position_embeddings``.
    """
    if model_path.is_dir():
        try:
            config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value = (config.get("text_config") or config).get("max_position_embeddings")
    else:
        metadata = getattr(tokenizer, "metadata", {})
        value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    try:
        length = int(value)
    except (TypeError, ValueError):
        return None
    return length if length > 0 else None


def _check_lengths(ids: list[tuple[list[int], list[int]]], model_path: Path, tokenizer: Tokenizer) -> None:
    """Refuse a prompt with more tokens than any context of the model holds: its rows could never be used.

    Checked before the model runs (a 100,000-character prompt would otherwise cost minutes
    and write a file no context can take).
    """
    trained = trained_context(model_path, tokenizer)
    limit = trained or UNKNOWN_MODEL_CONTEXT
    where = "the model's n_ctx_train" if trained else "pyactadd run's default --n-ctx; the model does not give its own"
    for index, pair in enumerate(ids):
        for name, seq in zip(("positive", "negative"), pair):
            if len(seq) > limit:
                which = f"the {name} prompt" if len(ids) == 1 else f"pair {index + 1}'s {name} prompt"
                raise InputError(
                    f"{which} is {len(seq)} tokens, more than the {limit} positions a context can hold ({where}): "
                    f"the vector's rows could not be used; shorten it to at most {limit} tokens"
                )


def run_method(
    prepared: Prepared,
    method: Method,
    *,
    coeff: float,
    center: bool = False,
    zero_rows: Sequence[int] = (),
    zero_outliers: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    bar: bool = False,
    stacklevel: int = 2,
    backend: ExtractBackend = TORCH,
) -> Steered:
    """Record what ``method`` reads, aggregate, zero rows and warn about sinks.

    Arguments are checked already (:mod:`pyactadd.extract.options`). ``progress``: a line
    on stderr when the model is converted or streamed; ``bar``: a progress bar over the
    pairs. ``stacklevel`` is what the caller would pass to :func:`warnings.warn` for a
    :class:`SinkRowWarning`.
    """
    with progress_bar(len(prepared.ids), method.name, bar) as update:
        recorded, sinks = record(
            prepared, method.reads, batch_size=batch_size, on_batch=update, progress=progress, sinks=True, backend=backend
        )
    rows, explained = _aggregate(method, recorded, len(prepared.ids), coeff, center)
    metadata = {**method.metadata(center, explained), **backend.metadata()}
    if method.reads != POSITIONS:
        for layer in prepared.layers:
            sinks.check_last_tokens(layer, recorded[layer], prepared.ids)
        sinks.warn_last_tokens(prepared.tokenizer, prepared.anchor_id, stacklevel=stacklevel + 1)
        return Steered(rows, metadata, {})
    zeroed = _zero_rows(prepared, rows, sinks, zero_rows, zero_outliers, stacklevel=stacklevel + 1)
    return Steered(rows, metadata, zeroed)


def record(
    prepared: Prepared,
    reads: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], object] | None = None,
    progress: bool = False,
    sinks: bool = False,
    backend: ExtractBackend = TORCH,
) -> tuple[dict[int, np.ndarray], SinkCheck | None]:
    """The prepared pairs' activations at every chosen layer, read as ``reads`` says, in one pass over the model.

    The one place block inputs are recorded: the batches are planned, the source opened
    (:func:`pyactadd.extract.sources.open_block_inputs`: the model checked, the memory
    estimated, nothing computed yet) and run. With ``sinks``, :data:`REFERENCE_TEXT` runs
    in the same pass and the :class:`SinkCheck` comes back with the activations (else None);
    see :func:`pyactadd.extract.activations.record_pairs` for the rest.
    """
    last_tokens = reads == LAST_TOKENS
    reference = apply_anchor(prepared.tokenizer.encode(REFERENCE_TEXT), prepared.anchor_id) if sinks else None
    batches = pair_batches(prepared.ids, last_tokens=last_tokens, pad_id=prepared.pad_id, batch_size=batch_size)
    planned = ([Batch([reference])] if reference is not None else []) + batches
    if backend.name == "llama":  # inside llama.cpp, on the file's own weights (pyactadd.extract.llama_backend)
        run = llama_block_inputs(prepared.model_path, prepared.fingerprint, prepared.layers, backend)
    else:
        run = open_block_inputs(prepared.model_path, prepared.fingerprint, prepared.layers, planned, progress=progress)
    return record_pairs(
        run, prepared.ids, batches, prepared.layers, n_embd=prepared.fingerprint.n_embd, on_batch=on_batch, reference=reference
    )


def steering_vector(
    prepared: Prepared, method: Method, steered: Steered, coeff: float, *, name_method: bool = True
) -> SteeringVector:
    """The steering vector of one run; ``name_method`` records the method and pair count in ``extra``.

    With a single pair the prompts are kept, and for per-position rows their token ids
    and the pad token too.
    """
    extra: dict[str, object] = {"method": method.name, "n_pairs": len(prepared.ids)} if name_method else {}
    extra.update(steered.metadata)
    single = prepared.pairs[0] if len(prepared.pairs) == 1 else None
    per_position = method.reads == POSITIONS
    return SteeringVector(
        layers={layer: np.ascontiguousarray(rows, dtype=np.float32) for layer, rows in steered.rows.items()},
        fingerprint=prepared.fingerprint,
        alignment=method.alignment,
        coefficient=coeff,
        positive=single.positive if single else None,
        negative=single.negative if single else None,
        positive_ids=prepared.ids[0][0] if single and per_position else None,
        negative_ids=prepared.ids[0][1] if single and per_position else None,
        anchor=prepared.anchor,
        anchor_id=prepared.anchor_id,
        pad_id=prepared.pad_id if per_position else None,
        model_hint=prepared.fingerprint.architecture,
        extra=extra,
        zeroed_rows=dict(steered.zeroed),
    )


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
    backend: str = "torch",
    n_gpu_layers: int | None = None,
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
        backend: ``"torch"`` (float32 PyTorch, the paper's numerics) or ``"llama"`` (inside
            llama.cpp on the file's own quantized weights, any architecture llama.cpp runs;
            the file then records ``backend``; see :mod:`pyactadd.extract.llama_backend`).
        n_gpu_layers: ``backend="llama"`` only: layers llama.cpp offloads to a GPU (-1: all).

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
    coeff = checked_coeff(coeff)
    check_coefficient(coeff)
    chosen = checked_backend(backend, n_gpu_layers)
    pair = Pair(checked_prompt("positive", positive), checked_prompt("negative", negative))
    prepared = prepare([pair], layers, model, pad, anchor)
    rows = checked_rows(zero_rows, prepared.n_positions)
    actadd = METHODS["actadd"]
    steered = run_method(
        prepared, actadd, coeff=coeff, zero_rows=rows, zero_outliers=zero_outliers, progress=progress, backend=chosen
    )
    return steering_vector(prepared, actadd, steered, coeff, name_method=False)


def _aggregate(
    method: Method, recorded: dict[int, np.ndarray], n_pairs: int, coeff: float, center: bool
) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """``coeff`` times the method's rows for every layer, and the explained fractions it reports."""
    rows, explained = {}, {}
    for layer, data in recorded.items():
        try:
            found, fraction = method.aggregate(data, n_pairs, center)
        except InputError as exc:
            raise InputError(f"layer {layer}: {exc}") from None
        rows[layer] = scaled_rows(found, coeff, layer)
        if fraction is not None:
            explained[layer] = fraction
    return rows, explained


def _zero_rows(
    prepared: Prepared,
    rows: dict[int, np.ndarray],
    sinks: SinkCheck,
    chosen: Sequence[int],
    zero_outliers: bool,
    *,
    stacklevel: int,
) -> dict[int, list[int]]:
    """Zero the ``chosen`` per-position rows (and the outliers with ``zero_outliers``); warn about the other outliers."""
    outliers = sinks.row_outliers()
    zeroed = {layer: set(chosen) for layer in prepared.layers}
    if zero_outliers:
        for outlier in outliers:
            zeroed[outlier.layer].add(outlier.position)
    for layer, positions in zeroed.items():
        if positions:
            rows[layer][sorted(positions)] = 0.0
    warned = [o for o in outliers if o.position not in zeroed[o.layer]]
    warn_rows(warned, prepared.tokenizer, prepared.anchor_id, n_pairs=len(prepared.ids), stacklevel=stacklevel + 1)
    return {layer: sorted(positions) for layer, positions in zeroed.items() if positions}


@contextlib.contextmanager
def progress_bar(total: int, what: str, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """Yield ``update(n)`` of a progress bar over ``total`` pairs on stderr, or None when not ``enabled``."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, unit="pair", desc=f"{what}: forward passes", file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
