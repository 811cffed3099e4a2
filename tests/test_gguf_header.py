"""The shared GGUF header reader (pyactadd.gguf_header) and its two callers' messages.

Files are built byte by byte, so every check (magic, version, byte order, duplicates,
alignment, bounds) is exercised with exactly one thing wrong. The steering-file reader
(``SteeringVector.load``) and the weight reader (``gguf_weights.read_header``) must both
refuse each of them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyactadd import gguf_header
from pyactadd.errors import SteeringFileError
from pyactadd.extract import gguf_weights
from pyactadd.vector.value import SteeringVector

N = 8


def _string(text: str, order: str = "<") -> bytes:
    data = text.encode()
    return struct.pack(order + "Q", len(data)) + data


def build(
    kv: list[tuple[str, int, bytes]],
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    data: bytes = b"",
    *,
    version: int = 3,
    order: str = "<",
    alignment: int = 32,
) -> bytes:
    """A GGUF file: ``kv`` as (key, value type, encoded value), tensors as (name, dims, type, offset)."""
    out = b"GGUF" + struct.pack(order + "IQQ", version, len(tensors), len(kv))
    for key, vtype, value in kv:
        out += _string(key, order) + struct.pack(order + "I", vtype) + value
    for name, dims, ggml_type, offset in tensors:
        out += _string(name, order) + struct.pack(order + "I", len(dims)) + struct.pack(order + "Q" * len(dims), *dims)
        out += struct.pack(order + "IQ", ggml_type, offset)
    out += bytes(-len(out) % alignment)
    return out + data


ARCH = ("general.architecture", int(gguf.GGUFValueType.STRING), _string("controlvector"))
ROW = np.arange(N, dtype=np.float32)


def good(order: str = "<") -> bytes:
    arch = (ARCH[0], ARCH[1], _string("controlvector", order))
    data = ROW.astype(order + "f4").tobytes()
    return build([arch], [("direction.2", (N,), 0, 0)], data, order=order)


def test_a_good_file_parses_with_offsets():
    header = gguf_header.parse_header(good())
    assert header.version == 3 and header.byte_order == "<" and header.alignment == 32
    assert header.metadata["general.architecture"].value == "controlvector"
    (tensor,) = header.tensors
    assert tensor.name == "direction.2" and tensor.shape == (N,) and tensor.n_bytes == 4 * N
    assert tensor.offset == header.data_offset
    assert np.array_equal(np.frombuffer(good(), dtype="<f4", count=N, offset=tensor.offset), ROW)


def test_big_endian_files_read_like_little_endian(tmp_path):
    header = gguf_header.parse_header(good(">"))
    assert header.byte_order == ">" and header.version == 3
    path = tmp_path / "be.gguf"
    path.write_bytes(good(">"))
    np.testing.assert_array_equal(SteeringVector.load(path).layers[3][0], ROW)
    with pytest.raises(gguf_weights.Unsupported, match="big-endian"):
        gguf_weights.read_header(path)


def test_arrays_can_be_skipped():
    tokens = struct.pack("<IQ", int(gguf.GGUFValueType.STRING), 3) + b"".join(_string(t) for t in ("a", "bc", "d"))
    ids = struct.pack("<IQ", int(gguf.GGUFValueType.INT32), 2) + struct.pack("<ii", 5, -1)
    data = build([ARCH, ("t", int(gguf.GGUFValueType.ARRAY), tokens), ("i", int(gguf.GGUFValueType.ARRAY), ids)], [])
    full = gguf_header.parse_header(data)
    assert full.metadata["t"].value == ["a", "bc", "d"] and full.metadata["i"].value == [5, -1]
    skipped = gguf_header.parse_header(data, arrays=False)
    assert skipped.metadata["t"].value == gguf_header.SkippedArray(3)
    assert skipped.metadata["i"].sub_type == gguf.GGUFValueType.INT32


U32 = int(gguf.GGUFValueType.UINT32)
BAD = {
    "magic": (b"GGUG" + good()[4:], "not a GGUF file"),
    "version": (build([ARCH], [], version=1), "unsupported GGUF version 1"),
    "duplicate key": (build([ARCH, ("k", U32, struct.pack("<I", 1)), ("k", U32, struct.pack("<I", 2))], []), "duplicate metadata key 'k'"),
    "duplicate tensor": (
        build([ARCH], [("direction.1", (N,), 0, 0), ("direction.1", (N,), 0, 32)], bytes(64)),
        "duplicate tensor name 'direction.1'",
    ),
    "alignment": (build([ARCH, ("general.alignment", U32, struct.pack("<I", 24))], []), "general.alignment 24 is not a power of two"),
    "unaligned": (build([ARCH], [("direction.1", (N,), 0, 4)], bytes(64)), "data offset 4 is not aligned to 32"),
    "past the end": (build([ARCH], [("direction.1", (N,), 0, 0)], bytes(4)), "past the end of the file"),
    "dims": (build([ARCH], [("direction.1", (N, 1, 1, 1, 1), 0, 0)], bytes(64)), "has 5 dimensions"),
    "type": (build([ARCH], [("direction.1", (N,), 99, 0)], bytes(64)), "unknown type 99"),
    "cut": (good()[:30], "inside the header"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_problem_has_its_own_message_in_both_readers(tmp_path: Path, name: str):
    content, message = BAD[name]
    with pytest.raises(gguf_header.GGUFHeaderError, match=message):
        gguf_header.parse_header(content)
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(SteeringFileError, match=message) as excinfo:
        SteeringVector.load(path)
    assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)
    with pytest.raises(gguf_weights.Unsupported):
        gguf_weights.read_header(path)


def test_the_architecture_check_runs_before_the_rest_of_the_header():
    seen = []

    def refuse(name: str) -> None:
        seen.append(name)
        raise SteeringFileError(f"architecture {name}")

    broken = build([("general.architecture", ARCH[1], _string("llama")), ("x", 99, b"")], [])
    with pytest.raises(SteeringFileError, match="architecture llama"):
        gguf_header.parse_header(broken, check_architecture=refuse)
    assert seen == ["llama"]
