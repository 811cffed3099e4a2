"""``pyactadd config``: compiler and linker flags for C/C++ programs using the C API (like pkg-config).

The engine a C/C++ application links must be the very library pyactadd installed, and it
must run against the libllama/libggml of the pinned llama-cpp-python it was compiled
for, so the flags point at those installed files (with rpaths, so the program runs
without ``LD_LIBRARY_PATH``).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.errors import InstallError

_HEADER = "pyactadd.h"


def _library_file(directory: Path, name: str) -> Path | None:
    """The shared library ``lib<name>`` in ``directory`` (any platform suffix), or None."""
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    candidate = directory / f"lib{name}{suffix}"
    return candidate if candidate.exists() else None


@dataclass(frozen=True)
class BuildFlags:
    """Where the C API's header and libraries are installed."""

    pyactadd_include: Path  # holds pyactadd.h
    pyactadd_lib: Path  # holds libpyactadd
    llama_include: Path  # llama-cpp-python's llama.h, ggml.h, gguf.h
    llama_lib: Path  # llama-cpp-python's libllama, libggml, libggml-base

    @property
    def cflags(self) -> list[str]:
        return [f"-I{self.pyactadd_include}", f"-I{self.llama_include}"]

    @property
    def libs(self) -> list[str]:
        dirs = [self.pyactadd_lib, self.llama_lib]
        return (
            [f"-L{d}" for d in dirs]
            + [f"-Wl,-rpath,{d}" for d in dirs]
            + ["-lpyactadd", "-lllama", "-lggml", "-lggml-base"]
        )


def build_flags() -> BuildFlags:
    """Locate the installed header and libraries.

    The compiled engine lives beside the extension module ``pyactadd._engine`` (for an
    editable install that is site-packages, not the source tree), so it is found through
    the import system without importing (and so without loading) anything.

    Raises:
        InstallError: the pinned llama-cpp-python or pyactadd's compiled parts are missing.
    """
    from pyactadd.native import check_llama_cpp_version

    check_llama_cpp_version()
    llama_spec = importlib.util.find_spec("llama_cpp")
    engine_spec = importlib.util.find_spec("pyactadd._engine")
    if engine_spec is None or engine_spec.origin is None:
        raise InstallError("pyactadd's compiled engine is not installed: run `pip install .` in the pyactadd source tree")
    assert llama_spec is not None and llama_spec.origin is not None  # check_llama_cpp_version found it
    engine_dir = Path(engine_spec.origin).resolve().parent
    llama_dir = Path(llama_spec.origin).resolve().parent
    flags = BuildFlags(
        pyactadd_include=engine_dir / "include",
        pyactadd_lib=engine_dir,
        llama_include=llama_dir.parent / "include",
        llama_lib=llama_dir / "lib",
    )
    missing = []
    if not (flags.pyactadd_include / _HEADER).is_file():
        missing.append(str(flags.pyactadd_include / _HEADER))
    if _library_file(flags.pyactadd_lib, "pyactadd") is None:
        missing.append(f"libpyactadd in {flags.pyactadd_lib}")
    if not (flags.llama_include / "llama.h").is_file():
        missing.append(str(flags.llama_include / "llama.h"))
    if _library_file(flags.llama_lib, "llama") is None:
        missing.append(f"libllama in {flags.llama_lib}")
    if missing:
        raise InstallError(
            f"the C API files are not installed ({', '.join(missing)}): reinstall pyactadd with `pip install .`"
        )
    return flags


@main.command("config")
@click.option("--cflags", is_flag=True, help="Print the include flags (pyactadd.h and llama.cpp's headers).")
@click.option("--libs", is_flag=True, help="Print the linker flags (libpyactadd, libllama, libggml, with rpaths).")
def config_command(cflags: bool, libs: bool) -> None:
    """Print the flags a C/C++ build needs to use pyactadd's C API.

    The flags name the installed pyactadd.h and libpyactadd, and the headers and
    libraries of the llama-cpp-python pyactadd was built against (one llama.cpp per
    process). Paths are printed as they are, so they must not contain spaces.

    \b
    Examples:
      c++ cpp/examples/steer.cpp $(pyactadd config --cflags --libs) -o pyactadd-steer
      pyactadd config --cflags
    """
    if not cflags and not libs:
        raise click.UsageError("give --cflags, --libs or both")
    flags = build_flags()
    words = (flags.cflags if cflags else []) + (flags.libs if libs else [])
    click.echo(" ".join(words))
