"""pyactadd's one-row files in llama.cpp's OWN control-vector loader mean what pyactadd means.

The loader is llama.cpp's ``common_control_vector_load``, cut verbatim from the pinned
llama-cpp-python sdist and compiled against the installed wheel (see ``llama_cpp_loader.py``).
Its buffer is applied to a plain ``llama_cpp.Llama`` exactly as llama.cpp's
``common_init_from_params`` does for ``--control-vector``, and the logits must match
pyactadd applying the same file (through llama.cpp's cvec and through the engine).
Per-position files and ``direction.0`` are pyactadd extensions that llama.cpp refuses.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

import llama_cpp

from helpers.llama_cpp_loader import LoaderUnavailable, LoadResult, build_loader, run_loader
from pyactadd.runtime.steering import Steering, model_fingerprint
from pyactadd.vector.value import ModelFingerprint, SteeringVector

PROMPT = "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn"
LAYERS = (6, 12)  # pyactadd block inputs -> direction.5 and direction.11
SCALE = 4.0  # per element; with n_embd 576 a row norm of ~96, enough to move logits by > 1
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def loader() -> Path:
    try:
        return build_loader()
    except LoaderUnavailable as exc:
        reason = str(exc)
    # A failure, not a skip: without the loader these tests would prove nothing.
    pytest.fail(f"llama.cpp's control-vector loader is unavailable: {reason}", pytrace=False)


def make_llama(model_path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model_path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def plain_llama(default_model_path) -> llama_cpp.Llama:
    """A Llama without any pyactadd engine: the stock llama.cpp side."""
    return make_llama(default_model_path)


@pytest.fixture(scope="module")
def steered_llama(default_model_path) -> llama_cpp.Llama:
    """A Llama with pyactadd's Steering attached."""
    llama = make_llama(default_model_path)
    Steering.of(llama)
    return llama


@pytest.fixture(scope="module")
def fingerprint(plain_llama) -> ModelFingerprint:
    return model_fingerprint(plain_llama)


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, fingerprint) -> tuple[Path, SteeringVector]:
    rng = np.random.default_rng(1234)
    layers = {layer: (rng.standard_normal((1, fingerprint.n_embd)) * SCALE).astype(np.float32) for layer in LAYERS}
    vector = SteeringVector(layers=layers, fingerprint=fingerprint, alignment="all")
    path = tmp_path_factory.mktemp("cvec") / "random.gguf"
    vector.save(path)
    return path, vector


@pytest.fixture(scope="module")
def ids(plain_llama) -> list[int]:
    return plain_llama.tokenize(PROMPT.encode(), add_bos=True, special=True)


def all_logits(llama: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llama.reset()
    llama.eval(ids)
    return np.array(llama.scores[: len(ids)], dtype=np.float64)


def loaded(loader: Path, path: Path, strength: float) -> LoadResult:
    result = run_loader(loader, path, strength)
    assert result.returncode == 0, f"llama.cpp's loader refused {path.name}:\n{result.stderr}"
    return result


@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_loader_puts_each_row_at_its_block_output(loader, vector_file, fingerprint, strength):
    path, vector = vector_file
    result = loaded(loader, path, strength)

    # llama.cpp's buffer starts at il = 1 and ends at the highest direction.il in the file.
    expected = np.zeros((max(LAYERS) - 1, fingerprint.n_embd), dtype=np.float32)
    for layer in LAYERS:
        il = layer - 1
        expected[il - 1] = vector.layers[layer][0] * np.float32(strength)
    assert result.n_embd == fingerprint.n_embd
    assert result.data.shape == expected.shape
    assert np.array_equal(result.data, expected)


@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_loader_buffer_steers_like_pyactadd(loader, vector_file, fingerprint, plain_llama, steered_llama, ids, strength):
    path, _ = vector_file
    data = np.ascontiguousarray(loaded(loader, path, strength).data.reshape(-1))

    unsteered = all_logits(plain_llama, ids)
    # Exactly what common_init_from_params passes for --control-vector with default layer range.
    rc = llama_cpp.llama_set_adapter_cvec(
        plain_llama.ctx,
        data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        data.size,
        fingerprint.n_embd,
        1,
        fingerprint.n_layer,
    )
    assert rc == 0
    try:
        reference = all_logits(plain_llama, ids)
    finally:
        llama_cpp.llama_set_adapter_cvec(plain_llama.ctx, None, 0, fingerprint.n_embd, -1, -1)

    steering = Steering.of(steered_llama)
    got = {}
    n_rows_added = {}
    try:
        for use_llama_cvec in (True, False):
            steering.set([(SteeringVector.load(path), strength)], use_llama_cvec=use_llama_cvec)
            steering.reset_stats()
            got[use_llama_cvec] = all_logits(steered_llama, ids)
            n_rows_added[use_llama_cvec] = steering.stats()["n_rows_added"]
            steering.check_errors()
    finally:
        steering.clear()

    assert np.abs(reference - unsteered).max() > 0.5, "the vector must move the logits for the test to mean anything"
    # Which path pyactadd took: the cvec path adds nothing through the engine.
    assert n_rows_added[True] == 0
    assert n_rows_added[False] == len(ids) * len(LAYERS)
    assert np.abs(got[True] - reference).max() <= TOLERANCE
    assert np.abs(got[False] - reference).max() <= TOLERANCE


def test_loader_refuses_per_position_files(loader, fingerprint, tmp_path):
    """Documented limitation: 2-D (P > 1) tensors are a pyactadd extension."""
    rows = np.random.default_rng(1).standard_normal((3, fingerprint.n_embd)).astype(np.float32)
    path = tmp_path / "per_position.gguf"
    SteeringVector(layers={6: rows}, fingerprint=fingerprint, alignment="front").save(path)

    result = run_loader(loader, path, 1.0)
    assert result.returncode == 1
    assert "non-1D" in result.stderr
    assert SteeringVector.load(path).n_positions == 3  # pyactadd itself reads it


def test_loader_refuses_layer_one(loader, fingerprint, tmp_path):
    """Documented limitation: pyactadd layer L = 1 is direction.0, which llama.cpp rejects."""
    row = np.random.default_rng(2).standard_normal((1, fingerprint.n_embd)).astype(np.float32)
    path = tmp_path / "layer1.gguf"
    SteeringVector(layers={1: row}, fingerprint=fingerprint, alignment="all").save(path)

    result = run_loader(loader, path, 1.0)
    assert result.returncode == 1
    assert "zero" in result.stderr
    assert SteeringVector.load(path).layer_ids == [1]  # pyactadd itself reads it
