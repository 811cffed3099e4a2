"""llama.cpp's own control-vector loader, built from the llama-cpp-python sdist, for the tests.

llama.cpp reads ``--control-vector`` files with ``common_control_vector_load`` in
``common/common.cpp``. libcommon is not part of the llama-cpp-python wheel, so this module

1. downloads the llama-cpp-python sdist of the pinned version with pip into
   ``<cache>/llama-cpp-python-sdist/`` (``<cache>`` as in :func:`pyactadd.extract.torch_model.cache_root`)
   and checks its SHA-256;
2. reads ``common.cpp`` and ``common.h`` from the tar.gz and cuts out, verbatim, the loader
   functions and the two structs they use;
3. wraps them in a tiny ``main`` and compiles that against the wheel's headers and
   ``libggml-base`` (where the ``gguf_*`` functions live), caching the binary by a hash of
   its source and compile command;
4. runs the binary on a file and returns the buffer llama.cpp would pass to
   ``llama_set_adapter_cvec``.

Every failure raises :class:`LoaderUnavailable`; the tests turn it into a failure, never a
skip, so a broken download or build cannot make them pass vacuously.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyactadd.extract.torch_model import cache_root
from pyactadd.native import llama_cpp_python_pin

# The version pyproject.toml pins (read through pyactadd's metadata, never written here).
LLAMA_CPP_PYTHON_VERSION = llama_cpp_python_pin()
# The sdist of that version, pinned so the loader source cannot change under the tests
# (pip also checks PyPI's hash): update it together with the pin in pyproject.toml.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_FILE = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_COMMON_DIR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/common"
COMMON_CPP = f"{_COMMON_DIR}/common.cpp"
COMMON_H = f"{_COMMON_DIR}/common.h"

# Logging macros the cut-out code may use, mapped to plain stderr output (common's logger
# lives in the rest of libcommon, which is not built here).
_MACROS = {
    "COM_ERR": "#define COM_ERR(...) fprintf(stderr, __VA_ARGS__)",
    "COM_WRN": "#define COM_WRN(...) fprintf(stderr, __VA_ARGS__)",
}

_MAIN = r"""
// Test driver (not from llama.cpp): FILE STRENGTH OUT.bin -> int32 n_embd, then the floats.
int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s FILE STRENGTH OUT.bin\n", argv[0]);
        return 2;
    }
    const float strength = std::strtof(argv[2], nullptr);
    const common_control_vector_data cvec = common_control_vector_load({{strength, argv[1]}});
    if (cvec.n_embd == -1) {
        return 1;
    }
    FILE * out = std::fopen(argv[3], "wb");
    if (out == nullptr) {
        std::perror(argv[3]);
        return 2;
    }
    const int32_t n_embd = cvec.n_embd;
    bool ok = std::fwrite(&n_embd, sizeof(n_embd), 1, out) == 1;
    if (!cvec.data.empty()) {
        ok = ok && std::fwrite(cvec.data.data(), sizeof(float), cvec.data.size(), out) == cvec.data.size();
    }
    ok = (std::fclose(out) == 0) && ok;
    if (!ok) {
        std::perror(argv[3]);
        return 2;
    }
    return 0;
}
"""


class LoaderUnavailable(RuntimeError):
    """The sdist could not be fetched or read, or the loader could not be cut out or compiled."""


@dataclass(frozen=True)
class LoadResult:
    """What llama.cpp's loader made of one file.

    ``data`` is llama.cpp's buffer as rows ``[n_rows, n_embd]``: row ``il - 1`` is added
    to ``l_out-il`` (there is no row for ``il = 0``). ``returncode`` is 0 on success and 1
    when llama.cpp refused the file; ``stderr`` holds llama.cpp's messages.
    """

    returncode: int
    stderr: str
    n_embd: int | None = None
    data: np.ndarray | None = None


def llama_cpp_paths() -> tuple[Path, Path]:
    """The include and library directories of the installed llama-cpp-python wheel (as CMakeLists.txt finds them)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise LoaderUnavailable("llama_cpp is not installed")
    package = Path(spec.origin).resolve().parent
    include, lib = package.parent / "include", package / "lib"
    for needed in (include / "gguf.h", include / "ggml.h"):
        if not needed.is_file():
            raise LoaderUnavailable(f"llama-cpp-python's header {needed} is missing")
    if not any(lib.glob("libggml-base.*")):
        raise LoaderUnavailable(f"libggml-base is missing from {lib}")
    return include, lib


def check_installed_version() -> None:
    """Raise LoaderUnavailable unless the installed llama-cpp-python is the pinned one:
    the loader source must come from the same llama.cpp as the libraries it links."""
    installed = importlib.metadata.version("llama-cpp-python")
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise LoaderUnavailable(
            f"llama-cpp-python {installed} is installed but the loader test is pinned to "
            f"{LLAMA_CPP_PYTHON_VERSION} (pyproject.toml): install the pinned one, or update SDIST_SHA256 in {__file__} "
            "together with the pin"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sdist_path() -> Path:
    """The pinned llama-cpp-python sdist, downloaded into the cache on first use."""
    directory = cache_root() / "llama-cpp-python-sdist"
    path = directory / SDIST_FILE
    if not path.is_file():
        _download_sdist(directory)
    actual = _sha256(path)
    if actual != SDIST_SHA256:
        raise LoaderUnavailable(f"{path} has SHA-256 {actual}, expected {SDIST_SHA256}: delete it to download again")
    return path


def _download_sdist(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # "--no-binary :all:" would also build pip's isolated build environment from source,
    # cmake included (many minutes); only llama-cpp-python itself has to be an sdist.
    # pip still prepares the sdist's metadata, which needs scikit-build-core: reuse the
    # installed one when there is one, else let pip fetch it as a wheel.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary", "llama-cpp-python",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
    ]
    if importlib.util.find_spec("scikit_build_core") is not None:
        command.append("--no-build-isolation")
    # Download into a private directory and rename, so a killed download never leaves a
    # partial file under the final name.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        proc = subprocess.run([*command, "-d", tmp], capture_output=True, text=True)
        got = Path(tmp) / SDIST_FILE
        if proc.returncode != 0 or not got.is_file():
            raise LoaderUnavailable(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
                f"({shlex.join(command)} exited {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
            )
        os.replace(got, directory / SDIST_FILE)


def read_common_sources(sdist: Path) -> tuple[str, str]:
    """``common.cpp`` and ``common.h`` from the sdist, read from the archive without extracting it."""
    wanted = {COMMON_CPP: None, COMMON_H: None}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            # One pass over the archive; getmember() would scan the whole archive once per name.
            for member in tar:
                if member.name in wanted and member.isfile():
                    wanted[member.name] = tar.extractfile(member).read().decode("utf-8")
                    if all(text is not None for text in wanted.values()):
                        break
    except (OSError, tarfile.TarError, UnicodeDecodeError) as exc:
        raise LoaderUnavailable(f"cannot read {sdist}: {exc}") from exc
    missing = [name for name, text in wanted.items() if text is None]
    if missing:
        raise LoaderUnavailable(f"{sdist} lacks {', '.join(missing)}")
    return wanted[COMMON_CPP], wanted[COMMON_H]


def _cut(text: str, start: str, end_pattern: str, what: str) -> str:
    begin = text.find(start)
    if begin < 0:
        raise LoaderUnavailable(f"llama.cpp's {what} not found (looked for {start!r}): the source layout changed")
    begin = text.rfind("\n", 0, begin) + 1  # whole lines only
    match = re.compile(end_pattern, re.DOTALL).search(text, begin)
    if match is None:
        raise LoaderUnavailable(f"end of llama.cpp's {what} not found: the source layout changed")
    return text[begin:match.end()]


def extract_loader(common_cpp: str, common_h: str) -> tuple[str, str]:
    """The verbatim loader text (``// Control vector utils`` to the end of
    ``common_control_vector_load``) and the two struct definitions from ``common.h``."""
    functions = _cut(
        common_cpp,
        "// Control vector utils",
        # A function body ends at the first closing brace in column 0.
        r"common_control_vector_data common_control_vector_load\(const std::vector<[^\n]*\{\n.*?\n\}\n",
        "common_control_vector_load",
    )
    if "static common_control_vector_data common_control_vector_load_one(" not in functions:
        raise LoaderUnavailable("common_control_vector_load_one is not where it used to be: the source layout changed")
    structs = [
        _cut(common_h, f"struct {name} {{", r"\n\};\n", f"struct {name}")
        for name in ("common_control_vector_data", "common_control_vector_load_info")
    ]
    return functions, "\n".join(structs)


def loader_source(common_cpp: str, common_h: str) -> str:
    """The complete translation unit: includes, logging macros, llama.cpp's structs and loader, a driver ``main``."""
    functions, structs = extract_loader(common_cpp, common_h)
    used = set(re.findall(r"\b((?:COM|LOG)_[A-Z]+)\s*\(", functions))
    unknown = sorted(used - _MACROS.keys())
    if unknown:
        raise LoaderUnavailable(f"llama.cpp's loader now uses {', '.join(unknown)}: define them in _MACROS in {__file__}")
    parts = [
        "// Generated by pyactadd's tests/llama_cpp_loader.py from the llama-cpp-python "
        f"{LLAMA_CPP_PYTHON_VERSION} sdist; everything between the markers is verbatim llama.cpp.",
        "#include \"ggml.h\"",
        "#include \"gguf.h\"",
        "#include <algorithm>",
        "#include <cstdint>",
        "#include <cstdio>",
        "#include <cstdlib>",
        "#include <string>",
        "#include <vector>",
        "",
        *(_MACROS[name] for name in sorted(used)),
        "",
        "// ---- verbatim from vendor/llama.cpp/common/common.h ----",
        structs,
        "// ---- verbatim from vendor/llama.cpp/common/common.cpp ----",
        functions,
        "// ---- end of verbatim llama.cpp ----",
        _MAIN,
    ]
    return "\n".join(parts)


def build_loader() -> Path:
    """Path of the compiled loader binary, building it (and fetching the sdist) when not cached."""
    check_installed_version()
    include, lib = llama_cpp_paths()
    source = loader_source(*read_common_sources(sdist_path()))
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise LoaderUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    compile_flags = ["-std=c++17", "-O1", f"-I{include}"]
    # Libraries after the source: the linker resolves gguf_* only for objects seen earlier.
    link_flags = [f"-L{lib}", "-lggml-base", f"-Wl,-rpath,{lib}"]
    # The library path is baked in as the rpath, so it is part of the key.
    key = hashlib.sha256("\0".join([source, compiler, *compile_flags, *link_flags]).encode()).hexdigest()[:16]
    directory = cache_root() / "llama-cpp-loader" / key
    binary = directory / "cvec_load"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename: concurrent test runs never see half a file.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        src, out = Path(tmp) / "cvec_load.cpp", Path(tmp) / "cvec_load"
        src.write_text(source, encoding="utf-8")
        command = [compiler, *compile_flags, str(src), "-o", str(out), *link_flags]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise LoaderUnavailable(
                f"compiling llama.cpp's control-vector loader failed ({shlex.join(command)}):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-6000:]}"
            )
        os.replace(src, directory / "cvec_load.cpp")  # kept for reading what was compiled
        os.replace(out, binary)
    return binary


def run_loader(binary: Path, path: str | os.PathLike[str], strength: float) -> LoadResult:
    """Run llama.cpp's ``common_control_vector_load({{strength, path}})`` on one file."""
    with tempfile.TemporaryDirectory(prefix="pyactadd-cvec-") as tmp:
        out = Path(tmp) / "cvec.bin"
        proc = subprocess.run([str(binary), str(path), repr(float(strength)), str(out)], capture_output=True, text=True)
        if proc.returncode == 1:
            return LoadResult(1, proc.stderr)
        if proc.returncode != 0:
            raise LoaderUnavailable(f"{binary} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        raw = out.read_bytes()
    n_embd = int(np.frombuffer(raw[:4], dtype=np.int32)[0])
    data = np.frombuffer(raw[4:], dtype=np.float32)
    if n_embd <= 0 or data.size % n_embd:
        raise LoaderUnavailable(f"loader output is malformed: n_embd={n_embd}, {data.size} floats")
    return LoadResult(0, proc.stderr, n_embd, data.reshape(-1, n_embd).copy())
