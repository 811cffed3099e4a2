"""Recording the residual stream entering chosen blocks, with forward pre-hooks.

A forward pre-hook on block ``L`` sees exactly ``hidden_states[L]`` of transformers, which
is pyactadd's layer ``L`` (see :mod:`pyactadd.vector.layers`). :func:`record_block_inputs`
runs one batch; :func:`record_pairs` runs many pairs in batches, in either of the two
ways the extraction methods read them (:data:`pyactadd.extract.methods.POSITIONS` and
``LAST_TOKENS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.torch_model import model_blocks

if TYPE_CHECKING:
    import torch

    from pyactadd.extract.sinks import SinkCheck

PairIds = Sequence[tuple[list[int], list[int]]]
"""Token ids of each pair: (positive, negative), unpadded."""


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

    rows = _checked_rows(batch_ids)
    mask_rows = None if attention_mask is None else _checked_mask(attention_mask, rows)
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


def _checked_rows(batch_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    rows = [list(ids) for ids in batch_ids]
    if not rows or not rows[0]:
        raise InputError("record_block_inputs needs at least one non-empty prompt")
    if any(len(ids) != len(rows[0]) for ids in rows):
        raise InputError(
            f"prompts must have the same number of tokens for one batched pass, got {[len(ids) for ids in rows]}: pad them"
        )
    return rows


def _checked_mask(mask: Sequence[Sequence[int]], rows: list[list[int]]) -> list[list[int]]:
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


def record_pairs(
    model: torch.nn.Module,
    ids: PairIds,
    layers: Sequence[int],
    *,
    last_tokens: bool,
    pad_id: int,
    n_embd: int,
    batch_size: int,
    on_batch: Callable[[int], object] | None = None,
    sinks: SinkCheck | None = None,
) -> dict[int, np.ndarray]:
    """Run many pairs through ``model`` in batches of ``batch_size``, both prompts of a pair in one batch.

    ``last_tokens=False`` (every position): every prompt is right-padded with ``pad_id``
    to the longest prompt of all pairs (pads are real tokens: no mask), and the result is
    the per-position differences ``positive - negative`` summed over pairs,
    ``{L: float64 [P, n_embd]}``.

    ``last_tokens=True``: prompts are right-padded within a batch and the padding masked
    out, so a last token's causal context is never padding; the result is each prompt at
    its last real token, ``{L: float32 [2 n_pairs, n_embd]}``, pair i's positive prompt at
    row ``2i`` and its negative at ``2i + 1``.

    ``on_batch(n)`` is called after each batch with its number of pairs; ``sinks`` sees
    every batch's residuals (padding counted only where it is not masked).
    """
    n_positions = max(len(seq) for pair in ids for seq in pair)
    shape = (2 * len(ids), n_embd) if last_tokens else (n_positions, n_embd)
    found = {layer: np.zeros(shape, dtype=np.float32 if last_tokens else np.float64) for layer in layers}
    for start in range(0, len(ids), batch_size):
        sequences = [seq for pair in ids[start : start + batch_size] for seq in pair]
        width = max(len(seq) for seq in sequences) if last_tokens else n_positions
        batch = [seq + [pad_id] * (width - len(seq)) for seq in sequences]
        mask = [[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences] if last_tokens else None
        residuals = record_block_inputs(model, batch, layers, attention_mask=mask)
        for layer in layers:
            h = residuals[layer]
            if last_tokens:
                for row, seq in enumerate(sequences):
                    found[layer][2 * start + row] = h[row, len(seq) - 1]
                if sinks is not None:
                    sinks.add_prompts(layer, h, [len(seq) for seq in sequences])
            else:
                found[layer] += (h[0::2] - h[1::2]).astype(np.float64).sum(axis=0)
                if sinks is not None:
                    sinks.add_pair_rows(layer, h, batch)
        if on_batch is not None:
            on_batch(len(sequences) // 2)
    return found
