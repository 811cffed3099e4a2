"""``pyactadd inspect``: format, layers in both conventions, shapes, norms, metadata, fit, stock loadability."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.vector.convert import inspect_file
from pyactadd.errors import SteeringFileError
from pyactadd.vector.value import ModelFingerprint, SteeringVector
from helpers.vector_files import assert_clean_error, default_target, rows, write_cvector_generator, write_repeng

SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def love(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "love.gguf"
    vector = SteeringVector(
        layers={6: rows(6, 3, 576), 12: rows(12, 3, 576)},
        fingerprint=SMOL,
        positive="Love",
        negative="Hate",
        positive_ids=[14412],
        negative_ids=[39, 381],
        pad_id=216,
        extra={"method": "actadd"},
    )
    vector.save(path)
    return path, vector


def test_pyactadd_file_json(love):
    path, vector = love
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "pyactadd steering file (format version 1)" and report["producer"] == "pyactadd"
    assert report["layout"] == "per_position" and report["n_positions"] == 3 and report["n_embd"] == 576
    assert report["layers"] == {"block_input": [6, 12], "block_output": [5, 11], "file_names": ["direction.5", "direction.11"]}
    assert [t["shape"] for t in report["tensors"]] == [[3, 576], [3, 576]]
    for tensor, layer in zip(report["tensors"], (6, 12)):
        expected = np.linalg.norm(vector.layers[layer].astype(np.float64), axis=1)
        np.testing.assert_allclose(tensor["row_norms"], expected, rtol=1e-6)
    assert report["metadata"]["pyactadd.prompt.positive"] == "Love"
    assert report["metadata"]["pyactadd.extra.method"] == "actadd"
    assert report["prompts"] == {"positive": "Love", "negative": "Hate"}
    assert report["fits"]["fits"] is True and report["fits"]["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert report["llama_cpp"]["loadable"] is False and "2-D" in report["llama_cpp"]["reason"]


def test_pyactadd_file_text(love):
    path, _ = love
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "block input L (pyactadd):        6, 12" in text
    assert "block output il (llama.cpp):     5, 11" in text
    assert "fits        SmolLM2-135M-Instruct.Q4_1.gguf: yes" in text
    assert "llama.cpp   refuses it" in text and "direction.5" in text


def test_stock_repeng_file(tmp_path):
    path = write_repeng(tmp_path / "r.gguf", {i: rows(i, width=576) / 10 for i in (3, 29)})
    report = inspect_file(path, model=default_target())
    assert report["producer"] == "repeng" and report["llama_cpp"] == {"loadable": True, "reason": None}
    assert report["layers"]["block_input"] == [4, 30]
    # Block 29's output (llama.cpp's last control-vector layer) has no pyactadd block input on a 30-block model.
    assert report["fits"]["fits"] is False and "layer 30" in report["fits"]["reason"]


def test_cvector_generator_file(tmp_path):
    path = write_cvector_generator(tmp_path / "c.gguf", [rows(i, width=576) for i in range(29)])
    report = inspect_file(path, model=default_target())
    assert report["producer"] == "cvector-generator"
    assert report["cvector_generator"]["computed_at_block_input"] == list(range(1, 30))
    assert report["cvector_generator"]["llama_cpp_applies_at_block_input"] == list(range(2, 31))
    assert report["cvector_generator"]["n_layer_hint"] == 30
    assert any("--shift-layers" in note for note in report["notes"])
    assert all(abs(t["row_norms"][0] - 1) < 1e-5 for t in report["tensors"])
    assert report["llama_cpp"]["loadable"] is True
    shifted = inspect_file(path, shift_layers=True, model=default_target())
    assert shifted["layers"]["block_input"] == list(range(1, 30))
    assert shifted["fits"]["fits"] is True
    assert shifted["llama_cpp"]["loadable"] is True  # about the file as stored, not the shifted reading
    text = invoke("inspect", path).output
    assert "computed at block input" in text and "suggest n_layer 30" in text


def test_tensor_file_with_and_without_convention(tmp_path):
    path = tmp_path / "sv.npz"
    np.savez(path, **{"5": rows(5, width=576), "7": rows(7, width=576)})
    unknown = inspect_file(path, model=default_target())
    assert unknown["layers"] is None and "--layer-convention" in unknown["notes"][0]
    assert [t["name"] for t in unknown["tensors"]] == ["5", "7"] and unknown["fits"]["fits"] is True
    known = inspect_file(path, layer_convention="block-output", model=default_target())
    assert known["layers"]["block_input"] == [6, 8] and known["layers"]["file_names"] == ["5", "7"]
    assert known["llama_cpp"]["loadable"] is False and "pyactadd convert" in known["llama_cpp"]["reason"]
    result = invoke("inspect", path, "--layer-convention", "block-input", "--json")
    assert json.loads(result.output)["layers"]["block_input"] == [5, 7]


def test_other_model_does_not_fit(tmp_path):
    path = write_repeng(tmp_path / "narrow.gguf", {3: rows(3)})
    report = inspect_file(path, model=default_target())
    assert report["fits"]["fits"] is False and "n_embd 16" in report["fits"]["reason"]


def test_without_a_model_the_fit_is_unknown(tmp_path):
    path = write_repeng(tmp_path / "r.gguf", {3: rows(3)})
    report = inspect_file(path)
    assert report["fits"] == {"model": None, "fits": None, "reason": "no model given to check against"}


def test_errors(tmp_path):
    assert_clean_error(invoke("inspect", tmp_path / "missing.gguf"), "no such file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    assert_clean_error(invoke("inspect", bad), "corrupt")
    with pytest.raises(SteeringFileError):
        inspect_file(bad)
