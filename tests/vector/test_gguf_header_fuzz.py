"""Field-aware corruption of real GGUF headers: only pyactadd's typed errors, never another exception.

test_vector_format.py flips random bytes of a steering file; this one overwrites whole
integer fields (counts, lengths, type tags, offsets) with the values that break parsers
(0, 2**31, 2**64 - 1, ...), in two real headers:

* the default model's own header (its vocabulary, the tensor table), written into a sparse
  file of the model's size so that a header that survives parses all the way through the
  tensor bounds; read by :func:`pyactadd.gguf_header.read_header`, with and without arrays;
* a steering file written by the real extraction, read by :meth:`SteeringVector.load`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyactadd.errors import SteeringFileError
from pyactadd.gguf_header import GGUFHeaderError, Header, read_header
from pyactadd.vector.value import SteeringVector

EDGE_VALUES = [0, 1, 2, 3, 4, 7, 8, 12, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_header(default_model_path) -> tuple[bytes, int]:
    """The default model's header bytes (up to its tensor data) and the model file's size."""
    header = read_header(default_model_path, arrays=False)
    with open(default_model_path, "rb") as handle:
        return handle.read(header.data_offset), default_model_path.stat().st_size


@pytest.fixture(scope="module")
def steering_bytes(tmp_path_factory) -> bytes:
    from pyactadd.extract.pipeline import extract

    path = tmp_path_factory.mktemp("real") / "love.gguf"
    extract("Love", "Hate", layers=[3, 6], anchor="bos", coeff=2.5).save(path)
    return path.read_bytes()


@st.composite
def field_edits(draw, data: bytes, hot: list[tuple[int, int]]):
    """A copy of ``data`` with 1-4 integer fields overwritten (positions mostly in ``hot``
    ranges), optionally cut short."""
    edited = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        start, stop = draw(st.sampled_from(hot + [(0, len(data))]))
        at = draw(st.integers(start, max(start, min(stop, len(data)) - 8)))
        width = draw(st.sampled_from([1, 4, 8]))
        value = draw(st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, 2**64 - 1))) % (1 << (8 * width))
        edited[at : at + width] = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
    if draw(st.integers(0, 3)) == 0:
        edited = edited[: draw(st.integers(0, len(edited)))]
    return bytes(edited)


def _hot_ranges(data: bytes) -> list[tuple[int, int]]:
    # The fixed header and first keys, and the tensor table at the end of the header.
    return [(0, 512), (max(0, len(data) - 16384), len(data))]


@pytest.mark.parametrize("arrays", [False, True], ids=["lengths-only", "arrays"])
@FUZZ
@given(data=st.data())
def test_model_header_corruption_raises_only_header_errors(model_header, tmp_path, arrays, data) -> None:
    header, file_size = model_header
    corrupted = data.draw(field_edits(header, _hot_ranges(header)))
    path = tmp_path / "model.gguf"
    with open(path, "wb") as handle:
        handle.write(corrupted)
        handle.truncate(max(file_size, len(corrupted)))  # sparse: the tensors' bytes are zeros
    try:
        parsed = read_header(path, arrays=arrays)
    except GGUFHeaderError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(parsed, Header)
        assert all(t.offset + t.n_bytes <= file_size for t in parsed.tensors)


@FUZZ
@given(data=st.data())
def test_steering_file_corruption_raises_only_steering_file_errors(steering_bytes, tmp_path, data) -> None:
    end = steering_bytes.index(b"direction.") + 256
    corrupted = data.draw(field_edits(steering_bytes, [(0, end)]))
    path = tmp_path / "v.gguf"
    path.write_bytes(corrupted)
    try:
        loaded = SteeringVector.load(path)
    except SteeringFileError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(loaded, SteeringVector)


def test_fixed_header_counts_near_the_limits(model_header, tmp_path) -> None:
    header, _ = model_header
    for n_tensors, n_kv in [(2**64 - 1, 0), (0, 2**64 - 1), (2**63, 2**63)]:
        path = tmp_path / "counts.gguf"
        path.write_bytes(header[:8] + struct.pack("<QQ", n_tensors, n_kv) + header[24:4096])
        with pytest.raises(GGUFHeaderError):
            read_header(path)
