"""Recording the residual stream entering chosen blocks, with forward pre-hooks.

A forward pre-hook on block ``L`` sees exactly ``hidden_states[L]`` of transformers, which
is pyactadd's layer ``L`` (see :mod:`pyactadd.vector.layers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.torch_model import model_blocks

if TYPE_CHECKING:
    import torch


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

    rows = [list(ids) for ids in batch_ids]
    if not rows or not rows[0]:
        raise InputError("record_block_inputs needs at least one non-empty prompt")
    if any(len(ids) != len(rows[0]) for ids in rows):
        raise InputError(
            f"prompts must have the same number of tokens for one batched pass, got {[len(ids) for ids in rows]}: pad them"
        )
    mask_rows = None if attention_mask is None else _checked_mask(attention_mask, rows)
    blocks = model_blocks(model)
    wanted = sorted({int(layer) for layer in layers})
    if not wanted:
        raise InputError("record_block_inputs needs at least one layer")
    for layer in wanted:
        if not 0 <= layer < len(blocks):
            raise InputError(f"layer {layer} is not a block input of this {len(blocks)}-block model")

    captured: dict[int, torch.Tensor] = {}
    last = wanted[-1]

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer] = hidden.detach().to(dtype=torch.float32, device="cpu").clone()
            if layer == last:
                raise _StopForward
            return None

        return hook

    handles = [blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True) for layer in wanted]
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
