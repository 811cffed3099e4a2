"""The engine and llama_cpp share one libllama, and a wrong llama-cpp-python is refused clearly."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

import llama_cpp

from pyactadd import native
from pyactadd.errors import InstallError


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
    with pytest.raises(InstallError, match=f"built for llama-cpp-python {native.LLAMA_CPP_PYTHON_VERSION} but {installed}"):
        native.check_llama_cpp_version()


def test_missing_llama_cpp_python_is_refused(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(InstallError, match="pip install llama-cpp-python==0.3.36"):
        native.check_llama_cpp_version()


def test_pin_matches_pyproject():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert text.count(f"llama-cpp-python=={native.LLAMA_CPP_PYTHON_VERSION}") == 2  # build and run time
