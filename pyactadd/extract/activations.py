"""Recording the residual stream entering chosen blocks, with forward pre-hooks.

A forward pre-hook on block ``L`` sees exactly ``hidden_states[L]`` of transformers, which
is pyactadd's layer ``L`` (see :mod:`pyactadd.vector.layers`). :func:`record_block_inputs`
runs one batch through a whole model; :func:`record_pairs` runs many pairs in batches, in
either of the two ways the extraction methods read them
(:data:`pyactadd.extract.methods.POSITIONS` and ``LAST_TOKENS``), through any
:data:`BlockInputs` (a whole model: :func:`whole_model_inputs`; a GGUF streamed block by
block: :mod:`pyactadd.extract.streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.sinks import SinkCheck
from pyactadd.extract.torch_model import model_blocks

if TYPE_CHECKING:
    import torch

PairIds = Sequence[tuple[list[int], list[int]]]
"""Token ids of each pair: (positive, negative), unpadded."""


@dataclass(frozen=True)
class Batch:
    """One batched pass: token-id rows of one length, and a right-padding mask (1 real, 0 pad) or None."""

    ids: list[list[int]]
    mask: list[list[int]] | None = None


BlockInputs = Callable[[Sequence[Batch], Sequence[int]], Iterable[dict[int, np.ndarray]]]
"""Where block inputs come from: ``run(batches, layers)`` gives each batch's ``{L: float32 [n, P, n_embd]}``, in order."""


def whole_model_inputs(model: torch.nn.Module) -> BlockInputs:
    """:data:`BlockInputs` of a loaded model: one forward pass per batch (:func:`record_block_inputs`), lazily."""

    def run(batches: Sequence[Batch], layers: Sequence[int]) -> Iterator[dict[int, np.ndarray]]:
        for batch in batches:
            yield record_block_inputs(model, batch.ids, layers, attention_mask=batch.mask)

    return run


class _StopForward(Exception):
    """Raised by the hook on the last needed block: the rest of the forward pass is not needed."""


def record_block_inputs(
    model: torch.nn.Module,
    batch_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    attention_mask: Sequence[Sequence[int]] | None = None,
) -> dict[int, np.ndarray]:
    """Run the prompts through ``model`` once and return the input of each block in ``layers``.

    All prompts go through in ONE batched forward pass, so they must have the same length
    (pad them first). Without ``attention_mask`` pad tokens are ordinary tokens that only
    influence positions after them. With it (1 for a real token, 0 for padding; only
    right padding, so every row's real tokens keep positions ``0 .. len - 1``), padded
    positions are masked out; their rows in the result are meaningless. The forward pass
    stops after the last block needed. Hooks are removed even when the pass fails.

    Returns:
        ``{L: float32 array [n_prompts, P, n_embd]}``, new arrays the caller may modify.

    Raises:
        InputError: no prompts, an empty prompt, prompts of different lengths, or a layer
            outside ``0 .. n_layer - 1``, or a mask that is not a right-padding mask of
            the batch's shape.
    """
    import torch

    rows = checked_batch(batch_ids)
    mask_rows = None if attention_mask is None else checked_mask(attention_mask, rows)
    blocks = model_blocks(model)
    wanted = sorted({int(layer) for layer in layers})
    if not wanted:
        raise InputError("record_block_inputs needs at least one layer")
    for layer in wanted:
        if not 0 <= layer < len(blocks):
            raise InputError(f"layer {layer} is not a block input of this {len(blocks)}-block model")

    captured: dict[int, torch.Tensor] = {}
    handles = [
        blocks[layer].register_forward_pre_hook(_capture(layer, captured, stop=layer == wanted[-1]), with_kwargs=True)
        for layer in wanted
    ]
    try:
        input_ids = torch.tensor(rows, dtype=torch.long, device=_device_of(model))
        extra = {}
        if mask_rows is not None:
            extra["attention_mask"] = torch.tensor(mask_rows, dtype=torch.long, device=input_ids.device)
        with torch.inference_mode():
            try:
                model(input_ids=input_ids, use_cache=False, **extra)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in wanted if layer not in captured]
    if missing:
        raise RuntimeError(f"blocks {missing} were not run by the forward pass of {type(model).__name__}")
    return {layer: captured[layer].numpy() for layer in wanted}


def _capture(layer: int, captured: dict, *, stop: bool):
    """A pre-hook that copies block ``layer``'s input into ``captured`` (and ends the pass when ``stop``)."""
    import torch

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured[layer] = hidden.detach().to(dtype=torch.float32, device="cpu").clone()
        if stop:
            raise _StopForward
        return None

    return hook


def checked_batch(batch_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """The batch's prompts as lists of ints.

    Raises:
        InputError: no prompts, an empty prompt, or prompts of different lengths.
    """
    rows = [[int(token) for token in ids] for ids in batch_ids]
    if not rows or not rows[0]:
        raise InputError("record_block_inputs needs at least one non-empty prompt")
    if any(len(ids) != len(rows[0]) for ids in rows):
        raise InputError(
            f"prompts must have the same number of tokens for one batched pass, got {[len(ids) for ids in rows]}: pad them"
        )
    return rows


def checked_mask(mask: Sequence[Sequence[int]], rows: list[list[int]]) -> list[list[int]]:
    """``mask`` as lists of ints.

    Raises:
        InputError: not the batch's shape, or not a right-padding mask.
    """
    checked = [[int(bit) for bit in row] for row in mask]
    if len(checked) != len(rows) or any(len(bits) != len(rows[0]) for bits in checked):
        raise InputError(f"attention_mask must have the batch's shape {len(rows)} x {len(rows[0])}")
    for bits in checked:
        n_real = sum(bits)
        if n_real < 1 or bits != [1] * n_real + [0] * (len(bits) - n_real):
            raise InputError("attention_mask must be a right-padding mask: ones, then zeros, at least one 1 per row")
    return checked


def _device_of(model: torch.nn.Module):
    return next(model.parameters()).device


def pair_batches(ids: PairIds, *, last_tokens: bool, pad_id: int, batch_size: int) -> list[Batch]:
    """The batches :func:`record_pairs` runs: ``batch_size`` pairs each, positive then negative prompt of each pair.

    Every position (``last_tokens=False``): right-padded with ``pad_id`` to the longest
    prompt of all pairs, no mask (pads are real tokens). Last tokens: right-padded within
    the batch and the padding masked out.
    """
    n_positions = max(len(seq) for pair in ids for seq in pair)
    batches = []
    for start in range(0, len(ids), batch_size):
        sequences = [seq for pair in ids[start : start + batch_size] for seq in pair]
        width = max(len(seq) for seq in sequences) if last_tokens else n_positions
        padded = [seq + [pad_id] * (width - len(seq)) for seq in sequences]
        mask = [[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences] if last_tokens else None
        batches.append(Batch(padded, mask))
    return batches


def record_pairs(
    run: BlockInputs,
    ids: PairIds,
    batches: Sequence[Batch],
    layers: Sequence[int],
    *,
    n_embd: int,
    on_batch: Callable[[int], object] | None = None,
    reference: Sequence[int] | None = None,
) -> tuple[dict[int, np.ndarray], SinkCheck | None]:
    """Run many pairs through ``run`` in ``batches``, as :func:`pair_batches` made them from ``ids``.

    Every position (unmasked batches): the result is the per-position differences
    ``positive - negative`` summed over pairs, ``{L: float64 [P, n_embd]}``.

    Last tokens (masked batches): each prompt at its last real token (whose causal context is
    never padding), ``{L: float32 [2 n_pairs, n_embd]}``, pair i's positive prompt at row
    ``2i`` and its negative at ``2i + 1``.

    ``reference`` (token ids), when given, runs first in the same pass and becomes the
    :class:`~pyactadd.extract.sinks.SinkCheck` that sees every batch's residuals (padding
    counted only where it is not masked); it is returned with the result (else None).
    ``on_batch(n)`` is called after each batch with its number of pairs.
    """
    last_tokens = batches[0].mask is not None
    n_positions = max(len(seq) for pair in ids for seq in pair)
    shape = (2 * len(ids), n_embd) if last_tokens else (n_positions, n_embd)
    found = {layer: np.zeros(shape, dtype=np.float32 if last_tokens else np.float64) for layer in layers}
    results = iter(run(([Batch([list(reference)])] if reference is not None else []) + batches, layers))
    sinks = SinkCheck(next(results)) if reference is not None else None
    start = 0
    for batch, residuals in zip(batches, results):
        lengths = [sum(bits) for bits in batch.mask] if batch.mask is not None else None
        for layer in layers:
            _add_batch(found[layer], residuals[layer], start, batch, lengths, layer, sinks)
        start += len(batch.ids) // 2
        if on_batch is not None:
            on_batch(len(batch.ids) // 2)
    return found, sinks


def _add_batch(
    found: np.ndarray, h: np.ndarray, start: int, batch: Batch, lengths: list[int] | None, layer: int, sinks: SinkCheck | None
) -> None:
    """One batch's block inputs ``h`` at ``layer`` into ``found`` (pairs from ``start`` on); ``lengths``: masked batches."""
    if lengths is not None:
        for row, length in enumerate(lengths):
            found[2 * start + row] = h[row, length - 1]
        if sinks is not None:
            sinks.add_prompts(layer, h, lengths)
    else:
        found += (h[0::2] - h[1::2]).astype(np.float64).sum(axis=0)
        if sinks is not None:
            sinks.add_pair_rows(layer, h, batch.ids)
