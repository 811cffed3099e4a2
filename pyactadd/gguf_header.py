"""The one GGUF header reader: metadata and the tensor table, checked while they are parsed.

Every GGUF file pyactadd opens goes through :func:`read_header` or :func:`parse_header`:
steering files (:mod:`pyactadd.vector.gguf_file`) and model weights
(:mod:`pyactadd.extract.gguf_weights`). The parser checks the magic, the version, the byte
order, duplicate keys and tensor names, ``general.alignment``, and that every string,
array and tensor lies inside the file, and raises :class:`NotGGUF` or
:class:`MalformedGGUF` with a one-line reason; callers add the file name and the fix.
gguf-py's ``GGUFReader`` trusts every count in a file (a corrupt array length makes it
loop up to 2**64 times), which is why nothing here uses it.

Tensor data is not read: each :class:`TensorInfo` carries its absolute offset, so a caller
reads (or memory-maps) only the tensors it needs. ``arrays=False`` keeps only the length
of metadata arrays, for model files whose tokenizer vocabulary nobody here reads.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pyactadd.errors import PyactaddError
from pyactadd.files import one_line

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; nothing writes it any more
ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


class GGUFHeaderError(PyactaddError):
    """A file's GGUF header cannot be read; the message is the reason, without the file name."""


class NotGGUF(GGUFHeaderError):
    """The file does not start with the GGUF magic; ``head`` holds its first bytes."""

    def __init__(self, head: bytes) -> None:
        super().__init__(f"not a GGUF file (it starts with {head!r})")
        self.head = head


class MalformedGGUF(GGUFHeaderError):
    """The header is cut short, points past the end of the file, or holds impossible values."""


class UnsupportedVersion(MalformedGGUF):
    """A GGUF version this reader does not parse (``version`` as read in the file's byte order)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported GGUF version {version}")
        self.version = version


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array read with ``arrays=False``: only its length is kept."""

    count: int


@dataclass(frozen=True)
class MetadataValue:
    """One metadata value with its GGUF type (``sub_type``: the item type of an array)."""

    type: GGUFValueType
    sub_type: GGUFValueType | None
    value: Any  # str, int, float, bool, a list for arrays, or SkippedArray


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: name, ggml type, dims (ggml order, fastest first), absolute data offset."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    offset: int

    @property
    def n_elements(self) -> int:
        """Number of values in the tensor."""
        return math.prod(self.dims)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dims in numpy order (slowest first), as gguf-py and numpy show them."""
        return tuple(reversed(self.dims))

    @property
    def n_bytes(self) -> int:
        """Size of the tensor's data in the file."""
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.n_elements // block_size * type_size


@dataclass(frozen=True)
class Header:
    """A parsed GGUF header."""

    version: int
    byte_order: str  # "<" little-endian, ">" big-endian (struct notation)
    alignment: int
    metadata: dict[str, MetadataValue]  # in file order
    tensors: list[TensorInfo]  # in file order
    data_offset: int  # where the tensor data starts


def read_header(
    path: str | os.PathLike[str], *, arrays: bool = True, check_architecture: Callable[[str], None] | None = None
) -> Header:
    """Read and check the header of the GGUF file at ``path`` (no tensor data).

    See :func:`parse_header` for ``arrays`` and ``check_architecture``.

    Raises:
        NotGGUF, MalformedGGUF: the reason, in one line.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as handle:
        head = handle.read(len(MAGIC))
        if head != MAGIC:
            raise NotGGUF(head)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return parse_header(data, arrays=arrays, check_architecture=check_architecture)


def parse_header(
    data: bytes | bytearray | mmap.mmap, *, arrays: bool = True, check_architecture: Callable[[str], None] | None = None
) -> Header:
    """Parse and check a GGUF header held in ``data`` (the whole file, or a memory map of it).

    ``arrays=False`` keeps each metadata array as a :class:`SkippedArray` (its length) and
    does not decode its items. ``check_architecture`` is called with ``general.architecture``
    as soon as it is read, so a caller can refuse a file before its vocabulary is walked.

    Raises:
        NotGGUF, MalformedGGUF: the reason, in one line.
    """
    if data[: len(MAGIC)] != MAGIC:
        raise NotGGUF(bytes(data[: len(MAGIC)]))
    cursor = _Cursor(data)
    version, n_tensors, n_kv = cursor.fixed_header()
    metadata = _read_metadata(cursor, n_kv, arrays, check_architecture)
    alignment = _alignment(metadata)
    table = _read_tensor_table(cursor, n_tensors)
    data_offset = -(-cursor.pos // alignment) * alignment
    tensors = [_checked_tensor(name, dims, kind, offset, alignment, data_offset, len(data)) for name, dims, kind, offset in table]
    return Header(version, cursor.order, alignment, metadata, tensors, data_offset)


class _Cursor:
    """Bounds-checked reads from the header, in the file's byte order."""

    def __init__(self, data: bytes | bytearray | mmap.mmap) -> None:
        self.data = data
        self.size = len(data)
        self.pos = len(MAGIC)
        self.order = "<"

    def fixed_header(self) -> tuple[int, int, int]:
        (version,) = self.take("I")
        if version & 0xFFFF == 0:  # written on a big-endian machine, as GGUFReader detects it
            self.order = ">"
            (version,) = struct.unpack(">I", struct.pack("<I", version))
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersion(version)
        n_tensors, n_kv = self.take("QQ")
        return version, n_tensors, n_kv

    def take(self, fmt: str) -> tuple[Any, ...]:
        width = struct.calcsize(self.order + fmt)
        if self.pos + width > self.size:
            raise MalformedGGUF(f"file ends at byte {self.size}, inside the header")
        values = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += width
        return values

    def skip(self, n_bytes: int, what: str) -> int:
        """Step over ``n_bytes`` and return where they start."""
        start = self.pos
        if n_bytes > self.size - start:
            raise MalformedGGUF(f"{what} of {n_bytes} bytes at byte {start} runs past the end of the file")
        self.pos += n_bytes
        return start

    def string(self, what: str, decode: bool = True) -> str | None:
        (length,) = self.take("Q")
        start = self.skip(length, what)
        if not decode:
            return None
        try:
            return bytes(self.data[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedGGUF(f"{what} at byte {start} is not valid UTF-8") from None

    def skip_strings(self, count: int, key: str) -> None:
        """Step over ``count`` strings (a model's vocabulary) in a tight loop, checking bounds."""
        data, size, pos = self.data, self.size, self.pos
        unpack = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise MalformedGGUF(f"file ends at byte {size}, inside array {key}")
            (length,) = unpack(data, pos)
            pos += 8
            if length > size - pos:
                raise MalformedGGUF(f"string in array {key} of {length} bytes at byte {pos} runs past the end of the file")
            pos += length
        self.pos = pos

    def value(self, vtype: int, key: str, keep: bool) -> MetadataValue:
        if vtype == GGUFValueType.STRING:
            return MetadataValue(GGUFValueType.STRING, None, self.string(f"string value of {key}", keep))
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, keep)
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise MalformedGGUF(f"key {_shown(key)} has unknown value type {vtype}")
        return MetadataValue(GGUFValueType(vtype), None, self.take(fmt)[0])

    def array(self, key: str, keep: bool) -> MetadataValue:
        item_type, count = self.take("IQ")
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[GGUFValueType(item_type)]
            start = self.skip(count * struct.calcsize(fmt), f"array {key}")
            items = list(struct.unpack_from(f"{self.order}{count}{fmt}", self.data, start)) if keep else None
        elif item_type == GGUFValueType.STRING and not keep:
            self.skip_strings(count, key)
            items = None
        elif item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            # Each item takes at least 8 bytes, so a corrupt count ends by running out of file.
            items = [self.value(item_type, key, keep).value for _ in range(count)]
        else:
            raise MalformedGGUF(f"array {key} has unknown item type {item_type}")
        return MetadataValue(GGUFValueType.ARRAY, GGUFValueType(item_type), items if keep else SkippedArray(count))


def _read_metadata(
    cursor: _Cursor, n_kv: int, arrays: bool, check_architecture: Callable[[str], None] | None
) -> dict[str, MetadataValue]:
    metadata: dict[str, MetadataValue] = {}
    for _ in range(n_kv):
        key = cursor.string("metadata key")
        if key in metadata:
            raise MalformedGGUF(f"duplicate metadata key {key!r}")
        (vtype,) = cursor.take("I")
        metadata[key] = cursor.value(vtype, key, keep=arrays or vtype != GGUFValueType.ARRAY)
        if key == ARCHITECTURE_KEY and vtype == GGUFValueType.STRING and check_architecture is not None:
            check_architecture(metadata[key].value)
    return metadata


def _alignment(metadata: dict[str, MetadataValue]) -> int:
    found = metadata.get(ALIGNMENT_KEY)
    if found is None or found.type != GGUFValueType.UINT32:
        return DEFAULT_ALIGNMENT
    alignment = found.value
    if alignment == 0 or alignment & (alignment - 1):
        raise MalformedGGUF(f"{ALIGNMENT_KEY} {alignment} is not a power of two")
    return alignment


def _read_tensor_table(cursor: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    table = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cursor.string("tensor name")
        if name in names:
            raise MalformedGGUF(f"duplicate tensor name {name!r}")
        names.add(name)
        (n_dims,) = cursor.take("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise MalformedGGUF(f"tensor {_shown(name)} has {n_dims} dimensions")
        dims = cursor.take("Q" * n_dims)
        ggml_type, offset = cursor.take("IQ")
        table.append((name, tuple(dims), ggml_type, offset))
    return table


def _checked_tensor(
    name: str, dims: tuple[int, ...], ggml_type: int, offset: int, alignment: int, data_offset: int, size: int
) -> TensorInfo:
    try:
        block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise MalformedGGUF(f"tensor {_shown(name)} has unknown type {ggml_type}") from None
    info = TensorInfo(name, ggml_type, dims, data_offset + offset)
    if info.n_elements % block_size:
        raise MalformedGGUF(f"tensor {_shown(name)} has {info.n_elements} elements, not a multiple of its block size")
    if offset % alignment:
        raise MalformedGGUF(f"tensor {_shown(name)} data offset {offset} is not aligned to {alignment}")
    end = info.offset + info.n_bytes
    if end > size:
        raise MalformedGGUF(f"tensor {_shown(name)} data ends at byte {end}, past the end of the file ({size} bytes)")
    return info


def _shown(name: str, limit: int = 80) -> str:
    """A key or tensor name as an error message shows it: a corrupt file's name may hold
    control characters and run on for kilobytes, and the message must stay one short line."""
    text = one_line(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"
