"""Reading and writing steering rows kept as plain tensors: ``.safetensors``, ``.npy``, ``.npz``, ``.pt``.

Researchers keep per-layer vectors (steering-vectors' ``layer_activations``, repeng's
``directions``, a notebook's dict) or per-position tensors in these files. This module
only moves arrays in and out, checking every size against the file before allocating;
what the keys mean (which layer, which convention) is decided in :mod:`.reading`.

Every failure to read raises :class:`~pyactadd.errors.SteeringFileError` with one line
naming the file and the fix. ``.pt`` files are opened with ``torch.load(weights_only=True)``,
which refuses arbitrary Python objects, so reading a file never runs code from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from pyactadd.errors import InputError, SteeringFileError
from pyactadd.files import atomic_write, one_line, short_reason

logger = logging.getLogger(__name__)

TENSOR_KINDS = ("safetensors", "npz", "npy", "pt")
MAX_BYTES = 2 << 30
"""Largest total of array data read from one file (steering rows are small; this stops bombs)."""

_FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")
_FIX = "re-save the tensors (see `pyactadd convert --help` for the layouts it reads)"


@dataclass(frozen=True)
class TensorEntry:
    """One array found in a tensor file."""

    key: str  # its name in the file; "" for a lone array, "[i]" for item i of a saved list
    array: np.ndarray  # float32, C-contiguous, the shape it has in the file
    dtype: str  # its dtype in the file, e.g. "float16" or "bfloat16"


@dataclass(frozen=True)
class TensorFile:
    """The arrays of a tensor file, in file order."""

    path: Path
    kind: str  # one of TENSOR_KINDS
    entries: list[TensorEntry]
    keyed: bool  # False: a lone array or a list (index = position in the list)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' __metadata__


# ---------------------------------------------------------------------------------------
# Sniffing


def sniff(path: Path) -> str:
    """Return ``"gguf"`` or one of :data:`TENSOR_KINDS` from the file's first bytes.

    Raises:
        SteeringFileError: missing, a directory, empty, or no known format.
    """
    if not path.exists():
        raise SteeringFileError(f"no such file: {path}; check the path")
    if path.is_dir():
        raise SteeringFileError(f"{path} is a directory: pass a steering file inside it")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise SteeringFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise SteeringFileError(f"{path} is empty: {_FIX}")
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _zip_kind(path)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and path.suffix.lower() in (".pt", ".pth", ".bin"):
        return "pt"  # torch's legacy (pre-1.6) pickle format
    raise SteeringFileError(
        f"{path} is not a format pyactadd reads (it starts with {head[:8]!r}): pass a GGUF control vector, "
        "or tensors in .safetensors, .npy, .npz or .pt"
    )


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise SteeringFileError(f"{path} is a corrupt zip archive ({short_reason(exc)}): {_FIX}") from exc
    if any(name.endswith("data.pkl") for name in names):
        return "pt"
    if names and all(name.endswith(".npy") for name in names):
        return "npz"
    raise SteeringFileError(
        f"{path} is a zip archive but neither a numpy .npz nor a torch .pt file: {_FIX}"
    )


# ---------------------------------------------------------------------------------------
# Reading


def read_tensor_file(path: str | os.PathLike[str], kind: str | None = None) -> TensorFile:
    """Read every array of a ``.safetensors``, ``.npy``, ``.npz`` or ``.pt`` file as float32.

    Raises:
        SteeringFileError: for every problem (no other exception escapes), naming the file.
    """
    file = Path(path)
    try:
        found = kind or sniff(file)
        readers: dict[str, Callable[[Path], TensorFile]] = {
            "safetensors": _read_safetensors, "npy": _read_npy_file, "npz": _read_npz, "pt": _read_pt,
        }
        if found not in readers:
            raise SteeringFileError(f"{file} is a {found} file, not a tensor file")
        result = readers[found](file)
        if not result.entries:
            raise SteeringFileError(f"{file} holds no arrays: {_FIX}")
        total = sum(entry.array.nbytes for entry in result.entries)
        if total > MAX_BYTES:
            raise SteeringFileError(f"{file} holds {total} bytes of arrays, more than steering rows need: {_FIX}")
        return result
    except SteeringFileError as exc:
        raise SteeringFileError(one_line(str(exc))) from exc.__cause__
    except InputError as exc:
        raise SteeringFileError(one_line(f"{file}: {exc}")) from exc
    except MemoryError:
        raise SteeringFileError(f"{file} declares arrays too large to load: {_FIX}") from None
    except OSError as exc:
        raise SteeringFileError(one_line(f"cannot read {file}: {exc.strerror or exc}")) from exc
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # the format libraries raise anything on corrupt input (Rust panics included)
        raise SteeringFileError(one_line(f"{file} is corrupt ({short_reason(exc)}): {_FIX}")) from exc


def _torch(file: Path, what: str) -> Any:
    """torch, or a one-line error: only .pt files and bfloat16 arrays need it."""
    try:
        import torch
    except ImportError:
        raise SteeringFileError(
            f"{file}: reading and writing {what} needs torch, which is not installed: pip install torch, "
            "or save the arrays as .safetensors or .npz"
        ) from None
    return torch


def _entry(file: Path, key: str, array: np.ndarray, dtype: str) -> TensorEntry:
    if dtype not in _FLOAT_KINDS:
        raise SteeringFileError(
            f"{file}: array {key or '(unnamed)'} has dtype {dtype}; steering rows must be floating point: {_FIX}"
        )
    if array.ndim not in (1, 2, 3) or array.size == 0:
        raise SteeringFileError(
            f"{file}: array {key or '(unnamed)'} has shape {list(array.shape)}; expected [n_embd], "
            f"[positions, n_embd] or, stacked by layer, [layers, positions, n_embd]: {_FIX}"
        )
    return TensorEntry(key, np.ascontiguousarray(array, dtype=np.float32), dtype)


def _read_npy_stream(stream: IO[bytes], available: int, file: Path, what: str) -> tuple[np.ndarray, str]:
    """Parse one .npy payload, checking the declared size against the bytes that exist."""
    fmt = np.lib.format
    start = stream.tell() if stream.seekable() else 0
    version = fmt.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(stream, max_header_size=10000)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(stream, max_header_size=10000)
    else:
        raise SteeringFileError(f"{file}: {what} has unsupported .npy version {version}: {_FIX}")
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise SteeringFileError(f"{file}: {what} has dtype {dtype}; steering rows must be floating point: {_FIX}")
    count = math.prod(shape)
    n_bytes = count * dtype.itemsize
    header = (stream.tell() - start) if stream.seekable() else 0
    if n_bytes > min(available - header, MAX_BYTES):
        raise SteeringFileError(
            f"{file}: {what} declares shape {list(shape)} ({n_bytes} bytes) but the file holds fewer: "
            f"it is truncated or corrupt; {_FIX}"
        )
    data = stream.read(n_bytes)
    if len(data) != n_bytes:
        raise SteeringFileError(f"{file}: {what} ends after {len(data)} of {n_bytes} data bytes: it is truncated; {_FIX}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array, np.dtype(dtype.newbyteorder("=")).name


def _read_npy_file(file: Path) -> TensorFile:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        array, dtype = _read_npy_stream(handle, size, file, "the array")
    return TensorFile(file, "npy", [_entry(file, "", array, dtype)], keyed=False)


def _read_npz(file: Path) -> TensorFile:
    entries = []
    with zipfile.ZipFile(file) as archive:
        infos = archive.infolist()
        if sum(info.file_size for info in infos) > 2 * MAX_BYTES:
            raise SteeringFileError(f"{file} declares more data than steering rows need: {_FIX}")
        for info in infos:
            key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
            with archive.open(info) as member:
                array, dtype = _read_npy_stream(member, info.file_size, file, f"array {key!r}")
            entries.append(_entry(file, key, array, dtype))
    return TensorFile(file, "npz", entries, keyed=True)


def _read_safetensors(file: Path) -> TensorFile:
    from safetensors import safe_open

    entries = []
    with safe_open(str(file), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
        keys = list(handle.keys())
        bf16 = [key for key in keys if handle.get_slice(key).get_dtype() == "BF16"]
        for key in keys:
            if key in bf16:
                continue
            array = handle.get_tensor(key)
            entries.append((key, array, array.dtype.name))
    if bf16:  # numpy has no bfloat16: read those through torch
        torch = _torch(file, "bfloat16 arrays")

        with safe_open(str(file), framework="pt") as handle:
            for key in bf16:
                entries.append((key, handle.get_tensor(key).to(torch.float32).numpy(), "bfloat16"))
        order = {key: index for index, key in enumerate(keys)}
        entries.sort(key=lambda item: order[item[0]])
    return TensorFile(
        file, "safetensors", [_entry(file, key, array, dtype) for key, array, dtype in entries], keyed=True, metadata=metadata
    )


def _read_pt(file: Path) -> TensorFile:
    import pickle

    torch = _torch(file, ".pt files")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in corrupt files
            warnings.simplefilter("ignore")
            loaded = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).splitlines()
        hint = next((line.strip() for line in detail if "Unsupported global" in line), short_reason(exc))
        raise SteeringFileError(
            f"{file} holds Python objects that pyactadd does not unpickle, for safety ({hint}): "
            "save a tensor, a list of tensors or a dict of tensors instead, e.g. "
            "torch.save(steering_vector.layer_activations, path)"
        ) from exc

    def as_entry(key: str, value: Any) -> TensorEntry:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            if not value.is_floating_point():
                raise SteeringFileError(f"{file}: tensor {key or '(unnamed)'} has dtype {dtype}; steering rows must be floating point")
            return _entry(file, key, value.detach().to(torch.float32).contiguous().numpy(), dtype)
        if isinstance(value, np.ndarray):
            return _entry(file, key, value, value.dtype.name)
        raise SteeringFileError(
            f"{file}: {('entry ' + key) if key else 'the file'} holds a {type(value).__name__}, not a tensor: "
            "save a tensor, a list of tensors or a dict of tensors"
        )

    if isinstance(loaded, dict):
        for key in loaded:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise SteeringFileError(f"{file}: dict key {key!r} is not a string or an integer layer number: {_FIX}")
        return TensorFile(file, "pt", [as_entry(str(key), value) for key, value in loaded.items()], keyed=True)
    if isinstance(loaded, (list, tuple)):
        return TensorFile(file, "pt", [as_entry(f"[{i}]", value) for i, value in enumerate(loaded)], keyed=False)
    return TensorFile(file, "pt", [as_entry("", loaded)], keyed=False)


# ---------------------------------------------------------------------------------------
# Writing


def write_tensor_file(
    arrays: dict[str, np.ndarray], path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None
) -> None:
    """Write named float32 arrays to ``path`` (kind from the suffix), atomically.

    ``.safetensors`` keeps ``metadata`` in its header; ``.npz`` has no place for it;
    ``.pt`` saves a dict whose keys are ints where the names are digits (steering-vectors'
    ``layer_activations`` layout).

    Raises:
        InputError: an unknown suffix.
        SteeringFileError: the file cannot be written (the target is left untouched).
    """
    target = Path(path)
    kind = target.suffix.lower().lstrip(".")
    if kind == "pth":
        kind = "pt"
    if kind not in ("safetensors", "npz", "pt"):
        raise InputError(f"cannot write {target}: use a .gguf, .safetensors, .npz or .pt file name")
    if target.is_dir():
        raise SteeringFileError(f"cannot write {target}: it is a directory; pass a file path")
    if not target.parent.is_dir():
        raise SteeringFileError(f"cannot write {target}: directory {target.parent} does not exist; create it first")

    def write(temp: Path) -> None:
        if kind == "safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(temp), metadata=metadata or None)
        elif kind == "npz":
            with open(temp, "wb") as handle:
                np.savez(handle, **arrays)
        else:
            torch = _torch(target, ".pt files")
            payload = {int(k) if k.isdigit() else k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
            torch.save(payload, str(temp))

    atomic_write(target, write)


def describe_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Decode JSON-looking metadata values (pyactadd writes lists as JSON) for display."""
    shown: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            shown[key] = json.loads(value) if value[:1] in "[{" else value
        except ValueError:
            shown[key] = value
    return shown


__all__ = ["TENSOR_KINDS", "TensorEntry", "TensorFile", "read_tensor_file", "sniff", "write_tensor_file"]
