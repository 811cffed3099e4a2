"""The engine and llama_cpp share one libllama, and a wrong llama-cpp-python is refused clearly."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import pytest

import llama_cpp

from pyactadd import native
from pyactadd.errors import InstallError

ROOT = Path(__file__).resolve().parents[2]


def test_engine_uses_the_libllama_llama_cpp_loaded():
    engine = native.engine_module()
    assert os.path.realpath(engine.llama_library_path()) == os.path.realpath(llama_cpp.llama_cpp._lib._name)
    # libggml-base sits beside it: one ggml in the process.
    assert os.path.dirname(os.path.realpath(engine.ggml_library_path())) == os.path.dirname(
        os.path.realpath(llama_cpp.llama_cpp._lib._name)
    )


@pytest.mark.parametrize("installed", ["0.3.35", "0.4.0"])
def test_other_llama_cpp_python_versions_are_refused(monkeypatch, installed):
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: installed if name == "llama-cpp-python" else real(name)
    )
    with pytest.raises(InstallError, match=f"built for llama-cpp-python {native.llama_cpp_python_pin()} but {installed}"):
        native.check_llama_cpp_version()


def test_missing_llama_cpp_python_is_refused(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(InstallError, match=re.escape(f"pip install llama-cpp-python=={native.llama_cpp_python_pin()}")):
        native.check_llama_cpp_version()


def test_every_reader_of_the_pin_agrees_with_pyproject():
    """pyproject.toml is the one place the version is written; native (through the installed
    metadata), the install script and the test helpers read that same value."""
    from helpers import llama_cpp_loader

    text = (ROOT / "pyproject.toml").read_text()
    pins = re.findall(r'"llama-cpp-python==([^"]+)"', text)
    assert len(pins) == 2 and len(set(pins)) == 1, pins  # build and run time
    assert native.llama_cpp_python_pin() == pins[0]
    assert native.LLAMA_CPP_PYTHON_VERSION == pins[0]  # the old name, kept for one release
    script = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-llama-cpp-python.sh"), "--print-version"],
        capture_output=True, text=True, cwd="/", timeout=60,
    )
    assert script.returncode == 0 and script.stdout.strip() == pins[0], script.stderr
    assert llama_cpp_loader.LLAMA_CPP_PYTHON_VERSION == pins[0]
    for path in ("pyactadd/native.py", "pyactadd/runtime/rpc.py", "scripts/install-llama-cpp-python.sh", "tests/helpers/llama_cpp_loader.py"):
        assert pins[0] not in (ROOT / path).read_text(), f"{path} writes the version itself"


@pytest.mark.parametrize(
    ("requires", "message"),
    [(None, "metadata is missing"), (["numpy>=1.26", 'llama-cpp-python==9.9; extra == "x"'], "pins no llama-cpp-python version")],
)
def test_a_missing_pin_is_an_install_error(monkeypatch, requires, message):
    def fake(name):
        if requires is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return requires

    monkeypatch.setattr(importlib.metadata, "requires", fake)
    native.llama_cpp_python_pin.cache_clear()
    try:
        with pytest.raises(InstallError, match=message):
            native.llama_cpp_python_pin()
    finally:
        monkeypatch.undo()
        native.llama_cpp_python_pin.cache_clear()
    assert native.llama_cpp_python_pin()
