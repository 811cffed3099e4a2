"""The one place that defines pyactadd's layer numbering.

pyactadd numbers a steering layer ``L`` the way the ActAdd paper does: ``L`` is the
residual stream *entering* block ``L`` ("before layer L"), which is exactly
``hidden_states[L]`` in transformers and the input a forward pre-hook on block ``L`` sees.
Valid values are ``1 <= L <= n_layer - 1``: ``L = 0`` is the raw embedding (nothing to
steer that a prompt change would not do) and ``L = n_layer`` is past the last block.

llama.cpp names the same stream by the block that *produced* it: the graph node
``l_out-<il>`` with ``il = L - 1``, which is also where llama.cpp's own control vectors
add their tensor ``direction.<il>``.
"""

from __future__ import annotations

from pyactadd.errors import InputError

MAX_LAYER = 1 << 16
"""Above any model's block count: the bound for a layer number read before the model is
known, so that a range such as ``1-999999999`` is refused before it is expanded."""


def to_llama_index(layer: int) -> int:
    """Map a block-input layer ``L`` to llama.cpp's block-output index ``il = L - 1``."""
    return layer - 1


def from_llama_index(il: int) -> int:
    """Map llama.cpp's block-output index ``il`` (``l_out-il``, ``direction.il``) to ``L = il + 1``."""
    return il + 1


def check_layer(layer: int, n_layer: int) -> int:
    """Return ``layer`` if it is a valid steering layer for a model with ``n_layer`` blocks.

    Raises:
        InputError: naming the valid range.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InputError(f"layer must be an integer, got {layer!r}")
    if not 1 <= layer <= n_layer - 1:
        raise InputError(
            f"layer {layer} is out of range for a model with {n_layer} blocks: "
            f"use 1 to {n_layer - 1} (L is the residual stream entering block L)"
        )
    return layer
