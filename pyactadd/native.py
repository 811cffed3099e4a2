"""Loading the compiled engine next to llama-cpp-python, with the checks that keep one ggml per process.

The engine is compiled against the headers of one llama-cpp-python release and links
libllama/libggml by soname. Importing ``llama_cpp`` first makes the dynamic loader hand
the engine the libraries llama_cpp already loaded; :func:`engine_module` then verifies
that, so a stray second copy of ggml (which would silently corrupt state) is refused.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from types import ModuleType

from pyactadd.errors import InstallError

# A requirement string of pyactadd's metadata that pins llama-cpp-python (PEP 503 names:
# '-', '_' and '.' are the same, case does not matter).
_PIN = re.compile(r"^llama[-_.]cpp[-_.]python\s*==\s*([^\s;,]+)\s*$", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def llama_cpp_python_pin() -> str:
    """The llama-cpp-python release the engine is compiled against, as pyproject.toml pins it.

    Read from the installed pyactadd's metadata (``importlib.metadata.requires``), so
    pyproject.toml is the one place the version is written.

    Raises:
        InstallError: pyactadd's metadata is missing or pins no llama-cpp-python version.
    """
    try:
        requires = importlib.metadata.requires("pyactadd") or []
    except importlib.metadata.PackageNotFoundError:
        raise InstallError("pyactadd's package metadata is missing: install it with `pip install .` (or -e .)") from None
    for requirement in requires:
        match = _PIN.match(requirement.strip())
        if match:
            return match.group(1)
    raise InstallError(
        "the installed pyactadd metadata pins no llama-cpp-python version (pyproject.toml needs "
        "'llama-cpp-python==X.Y.Z' in its dependencies): reinstall pyactadd with `pip install .`"
    )


def __getattr__(name: str) -> str:
    # Kept for one release: LLAMA_CPP_PYTHON_VERSION was a constant; use llama_cpp_python_pin().
    if name == "LLAMA_CPP_PYTHON_VERSION":
        return llama_cpp_python_pin()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_threads() -> int:
    """llama.cpp threads when none are given: every core, at most 8 (past that, decoding
    on the CPU stops getting faster and other processes starve)."""
    return max(1, min(os.cpu_count() or 1, 8))


def check_llama_cpp_version() -> None:
    """Raise InstallError unless the pinned llama-cpp-python is installed."""
    pin = llama_cpp_python_pin()
    try:
        found = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise InstallError(f"llama-cpp-python is not installed: pip install llama-cpp-python=={pin}") from None
    if found != pin:
        raise InstallError(
            f"pyactadd's engine is built for llama-cpp-python {pin} but {found} is installed: "
            f"pip install llama-cpp-python=={pin}, then reinstall pyactadd"
        )


@functools.lru_cache(maxsize=None)
def llama_cpp_module() -> ModuleType:
    """Import llama_cpp after checking its version."""
    check_llama_cpp_version()
    import llama_cpp

    return llama_cpp


@functools.lru_cache(maxsize=None)
def engine_module() -> ModuleType:
    """Import the compiled engine, making sure it shares llama_cpp's libllama."""
    llama_cpp = llama_cpp_module()
    try:
        from pyactadd import _engine
    except ImportError as exc:
        raise InstallError(
            f"pyactadd's compiled engine cannot be loaded ({exc}): reinstall pyactadd with "
            f"`pip install .` after llama-cpp-python=={llama_cpp_python_pin()}"
        ) from None
    ours = os.path.realpath(_engine.llama_library_path())
    theirs = os.path.realpath(llama_cpp.llama_cpp._lib._name)
    if ours != theirs:
        raise InstallError(
            f"the engine uses {ours} but llama_cpp loaded {theirs}: two copies of llama.cpp in one process; "
            "reinstall pyactadd against the installed llama-cpp-python"
        )
    return _engine
