"""``pyactadd inspect`` names the backend that made a file: ``pyactadd.extra.backend``, else torch."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.vector.convert import inspect_file
from pyactadd.vector.fingerprint import ModelFingerprint
from pyactadd.vector.value import SteeringVector


def test_backend_in_the_report(tmp_path):
    fingerprint = ModelFingerprint("llama", 4, 8, 100)
    rows = {3: np.ones((2, 4), np.float32)}
    torch_file, llama_file, stock = tmp_path / "t.gguf", tmp_path / "l.gguf", tmp_path / "s.gguf"
    SteeringVector(layers=rows, fingerprint=fingerprint).save(torch_file)
    SteeringVector(layers=rows, fingerprint=fingerprint, extra={"backend": "llama"}).save(llama_file)
    SteeringVector(layers={3: rows[3][:1]}, fingerprint=fingerprint).save(stock, llama_cpp=True)
    assert inspect_file(torch_file)["backend"] == "torch"
    assert inspect_file(llama_file)["backend"] == "llama"
    assert inspect_file(stock)["backend"] is None  # another writer's file: unknown
    text = CliRunner().invoke(main, ["inspect", str(llama_file)]).output
    assert "backend     llama (llama.cpp, the model file's own weights)" in text
    assert "backend     torch" in CliRunner().invoke(main, ["inspect", str(torch_file)]).output
