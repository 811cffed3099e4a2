"""``pyactadd compare`` and :func:`pyactadd.vector.compare.compare_vectors`: per-row cosines, norms, ratios."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.errors import InputError
from pyactadd.vector.compare import compare_vectors
from pyactadd.vector.fingerprint import ModelFingerprint
from pyactadd.vector.value import SteeringVector

FP = ModelFingerprint("llama", 4, 8, 100)


def vector(layers: dict, **kwargs) -> SteeringVector:
    return SteeringVector(layers={k: np.asarray(v, dtype=np.float32) for k, v in layers.items()}, fingerprint=FP, **kwargs)


def test_rows_norms_and_ratios():
    a = vector({3: [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], 5: np.ones((3, 4))})
    b = vector({3: [[0, 0, 0, 0], [2, 0, 0, 0], [1, -1, 0, 0]], 4: np.ones((3, 4))})
    report = compare_vectors(a, b)
    (layer,) = report["layers"]
    assert layer["layer"] == 3 and report["only_in_first"] == [5] and report["only_in_second"] == [4]
    zero, same, orthogonal = layer["rows"]
    assert zero["cosine"] is None and zero["norm_ratio"] is None  # a zero row has no cosine
    assert same["cosine"] == pytest.approx(1.0) and same["norm_ratio"] == pytest.approx(2.0)
    assert orthogonal["cosine"] == pytest.approx(0.0, abs=1e-12) and orthogonal["norm_first"] == pytest.approx(2**0.5)
    assert layer["min_cosine"] == pytest.approx(0.0, abs=1e-12) and layer["mean_cosine"] == pytest.approx(0.5)
    assert layer["cosine"] == pytest.approx(2 / (3**0.5 * 6**0.5))
    assert report["min_cosine"] == layer["min_cosine"]


def test_refusals():
    with pytest.raises(InputError, match="no layer in common"):
        compare_vectors(vector({3: [[1, 0, 0, 0]]}), vector({4: [[1, 0, 0, 0]]}))
    other = SteeringVector(layers={3: np.ones((1, 6), np.float32)}, fingerprint=ModelFingerprint("llama", 6, 8, 100))
    with pytest.raises(InputError, match="width 4 and 6"):
        compare_vectors(vector({3: [[1, 0, 0, 0]]}), other)
    note = compare_vectors(vector({3: [[1, 0, 0, 0]]}), vector({3: [[1, 0, 0, 0], [0, 1, 0, 0]]}))["notes"]
    assert "1 and 2 rows per layer" in note[0]


def test_cli_table_and_json(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    vector({3: [[0, 0, 0, 0], [1, 0, 0, 0]]}).save(a)
    vector({3: [[0, 0, 0, 0], [1, 1, 0, 0]]}, extra={"backend": "llama"}).save(b)
    text = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert text.exit_code == 0, text.output
    assert f"{b} (llama) against {a} (torch)" in text.output and "0.707107" in text.output
    data = json.loads(CliRunner().invoke(main, ["compare", str(a), str(b), "--json"]).output)
    assert data["first"]["backend"] == "torch" and data["second"]["backend"] == "llama"
    assert data["layers"][0]["rows"][1]["cosine"] == pytest.approx(0.5**0.5)
    missing = CliRunner().invoke(main, ["compare", str(a), str(tmp_path / "none.gguf")])
    assert missing.exit_code == 1 and missing.output.count("\n") == 1 and missing.output.startswith("Error: ")
