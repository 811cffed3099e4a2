"""Writing a vector as a pyactadd GGUF file, a stock llama.cpp control vector, or plain tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyactadd.errors import InputError
from pyactadd.vector.value import SteeringVector
from pyactadd.vector.convert.conventions import checked_convention, from_block_input
from pyactadd.vector.convert.reading import CONVENTION_METADATA_KEY
from pyactadd.vector.convert.tensor_files import write_tensor_file

OUTPUT_SUFFIXES = (".gguf", ".safetensors", ".npz", ".pt", ".pth")


def check_output(path: Path) -> str:
    """Return ``path``'s lower-case suffix if a writer knows it (``.gguf``, ``.safetensors``, ``.npz``, ``.pt``, ``.pth``).

    Raises:
        InputError: a suffix no writer knows.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"cannot tell the output format of {Path(path).name}: use a .gguf, .safetensors, .npz or .pt file name")
    return suffix


def save_vector(
    vector: SteeringVector,
    path: str | os.PathLike[str],
    *,
    llama_cpp: bool = False,
    layer_convention: str | None = None,
) -> None:
    """Write ``vector`` to ``path``; the suffix picks the format. Writes are atomic.

    * ``.gguf``: :meth:`SteeringVector.save`: a pyactadd file (every ``pyactadd.*`` key).
      With ``llama_cpp``: a stock control vector exactly as repeng and cvector-generator lay
      it out (no ``pyactadd.*`` keys, 1-D F32 ``direction.<L-1>``), which llama.cpp's own
      loader accepts.
    * ``.safetensors``, ``.npz``, ``.pt``: one array per layer named by its number in
      ``layer_convention`` (required), ``[n_embd]`` for one row per layer, else
      ``[positions, n_embd]``. .safetensors also records the convention and the
      fingerprint in its metadata.

    Raises:
        InputError: an unknown suffix, a missing convention, or ``llama_cpp`` with a
            vector llama.cpp cannot load (the message names the fix).
        SteeringFileError: the file cannot be written.
    """
    target = Path(path)
    if check_output(target) == ".gguf":
        if layer_convention is not None:
            raise InputError("a GGUF file always numbers tensors by block output (direction.L-1): drop the output layer convention")
        vector.save(target, llama_cpp=llama_cpp)
        return
    if llama_cpp:
        raise InputError("a stock llama.cpp control vector is a .gguf file: name the output *.gguf")
    if layer_convention is None:
        raise InputError(
            f"say how {target.name} should number layers: --to-convention block-input (hidden_states[i]) or "
            "block-output (the output of block i, as repeng and steering-vectors)"
        )
    convention = checked_convention(layer_convention)
    arrays = {
        str(from_block_input(layer, convention)): rows[0] if vector.n_positions == 1 else rows
        for layer, rows in vector.layers.items()
    }
    write_tensor_file(arrays, target, metadata=_tensor_metadata(vector, convention))


def _tensor_metadata(vector: SteeringVector, convention: str) -> dict[str, str]:
    """What a .safetensors output records besides the arrays (read back by :mod:`.reading`)."""
    fingerprint = vector.fingerprint
    return {
        CONVENTION_METADATA_KEY: convention,
        "pyactadd.alignment": vector.alignment,
        "pyactadd.n_positions": str(vector.n_positions),
        "pyactadd.layers.block_input": json.dumps(vector.layer_ids),
        "pyactadd.model.architecture": fingerprint.architecture or "",
        "pyactadd.model.n_embd": str(fingerprint.n_embd),
        "pyactadd.model.n_layer": str(fingerprint.n_layer or 0),
        "pyactadd.model.n_vocab": str(fingerprint.n_vocab or 0),
        "pyactadd.coefficient": repr(vector.coefficient),
    }
