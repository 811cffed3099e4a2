"""Tests for pyactadd.vector.value (the value object) and pyactadd.vector.gguf_file (the file format)."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from pyactadd.vector import gguf_file as gguf_format
from pyactadd.errors import InputError, ModelMismatchError, SteeringFileError
from pyactadd.vector.convert import inspect_file
from pyactadd.vector.gguf_file import write_steering_file
from pyactadd.vector.value import ModelFingerprint, SteeringVector


N_EMBD = 16
FINGERPRINT = ModelFingerprint(architecture="llama", n_embd=N_EMBD, n_layer=30, n_vocab=49152)


def make_vector(n_positions: int = 3, layers: tuple[int, ...] = (3, 7), seed: int = 0, **fields) -> SteeringVector:
    rng = np.random.default_rng(seed)
    rows = {layer: rng.standard_normal((n_positions, N_EMBD)).astype(np.float32) for layer in layers}
    return SteeringVector(layers=rows, fingerprint=fields.pop("fingerprint", FINGERPRINT), **fields)


def full_vector(n_positions: int) -> SteeringVector:
    return make_vector(
        n_positions,
        layers=(1, 3, 29),
        alignment="back",
        coefficient=0.1,  # not representable in float32: checks the stored value is the same
        positive="Love",
        negative="Hate",
        positive_ids=[1, 18883],
        negative_ids=[1, 12],
        anchor="bos",
        anchor_id=1,
        pad_id=220,
        model_hint="llama",
        extra={"tool": "test", "seed": 7, "big": 2**63 + 5, "ratio": 0.1, "flag": True, "empty": ""},
    )


def write_raw(path: Path, arch: str, kv: dict[str, tuple], tensors: dict[str, np.ndarray]) -> Path:
    """Write an arbitrary GGUF file with gguf-py, bypassing pyactadd's writer."""
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, vtype, *sub) in kv.items():
        writer.add_key_value(key, value, vtype, *sub)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_with_overrides(path: Path, vector: SteeringVector, overrides: dict[str, tuple], tensors=None) -> Path:
    """Write a pyactadd file whose metadata is changed by ``overrides`` (to test reader checks)."""
    writer = gguf.GGUFWriter(path, "controlvector")
    gguf_format._add_metadata(writer, vector)
    for key, (value, vtype, *sub) in overrides.items():
        writer.add_key_value(key, value, vtype, *sub)
    if tensors is None:
        tensors = {f"direction.{layer - 1}": rows for layer, rows in vector.layers.items()}
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def stock_file(path: Path, tensors: dict[str, np.ndarray] | None = None, hint: str = "llama") -> Path:
    tensors = tensors if tensors is not None else {"direction.5": np.arange(N_EMBD, dtype=np.float32) / 10}
    kv = {
        "controlvector.model_hint": (hint, GGUFValueType.STRING),
        "controlvector.layer_count": (len(tensors), GGUFValueType.UINT32),
    }
    return write_raw(path, "controlvector", kv, tensors)


# ---------------------------------------------------------------------------------------
# Round trips and layout


@pytest.mark.parametrize("n_positions", [1, 4])
def test_round_trip_keeps_every_value_and_field(tmp_path: Path, n_positions: int) -> None:
    vector = full_vector(n_positions)
    path = tmp_path / "v.gguf"
    vector.save(path)
    loaded = SteeringVector.load(path)

    assert loaded == vector
    for name in (
        "fingerprint", "alignment", "coefficient", "positive", "negative", "positive_ids",
        "negative_ids", "anchor", "anchor_id", "pad_id", "model_hint", "source", "extra",
    ):
        assert getattr(loaded, name) == getattr(vector, name), name
    assert loaded.layer_ids == [1, 3, 29]
    for layer, rows in vector.layers.items():
        assert loaded.layers[layer].dtype == np.float32
        assert loaded.layers[layer].flags.c_contiguous
        assert loaded.layers[layer].shape == (n_positions, N_EMBD)
        np.testing.assert_array_equal(loaded.layers[layer], rows)
    assert loaded.coefficient == float(np.float32(0.1))
    assert loaded.extra["big"] == 2**63 + 5
    assert os.listdir(tmp_path) == ["v.gguf"]


def test_round_trip_of_minimal_vector_keeps_unknowns(tmp_path: Path) -> None:
    fingerprint = ModelFingerprint(architecture=None, n_embd=N_EMBD, n_layer=None, n_vocab=None)
    vector = make_vector(1, layers=(2,), fingerprint=fingerprint)
    path = tmp_path / "v.gguf"
    vector.save(path)
    loaded = SteeringVector.load(path)
    assert loaded == vector
    assert loaded.fingerprint == fingerprint
    assert loaded.model_hint is None and loaded.positive is None and loaded.positive_ids is None
    assert loaded.anchor_id is None and loaded.pad_id is None


def test_zeroed_rows_is_a_typed_field_stored_as_before(tmp_path: Path) -> None:
    vector = make_vector(3, extra={"method": "actadd"}, zeroed_rows={7: [2, 0], 3: [1]})
    assert vector.zeroed_rows == {7: [0, 2], 3: [1]} and "zeroed_rows" not in vector.extra
    path = tmp_path / "v.gguf"
    vector.save(path)
    reader = gguf.GGUFReader(path)
    keys = [name for name in reader.fields if name.startswith("pyactadd.extra.")]
    assert keys == ["pyactadd.extra.method", "pyactadd.extra.zeroed_rows"]  # the key and place extraction used
    assert reader.get_field("pyactadd.extra.zeroed_rows").contents() == '{"7": [0, 2], "3": [1]}'
    loaded = SteeringVector.load(path)
    assert loaded.zeroed_rows == {7: [0, 2], 3: [1]} and loaded.extra == {"method": "actadd"}
    assert (loaded * 2).zeroed_rows == loaded.zeroed_rows
    with pytest.raises(InputError, match="zeroed_rows is a field"):
        make_vector(extra={"zeroed_rows": "{}"})
    with pytest.raises(InputError, match="zeroed_rows"):
        make_vector(zeroed_rows={3: [-1]})


def test_corrupt_zeroed_rows_is_a_steering_error(tmp_path: Path) -> None:
    path = write_with_overrides(
        tmp_path / "x.gguf", make_vector(3), {"pyactadd.extra.zeroed_rows": ("[1, 2", GGUFValueType.STRING)}
    )
    assert_steering_error(path, "pyactadd.extra.zeroed_rows is not a JSON object")


def test_single_row_file_has_llama_cpp_layout(tmp_path: Path) -> None:
    vector = make_vector(1, layers=(3, 7), alignment="all")
    path = tmp_path / "v.gguf"
    vector.save(path)

    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.types == [GGUFValueType.UINT32] and layer_count.contents() == 2
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert [t.name for t in reader.tensors] == ["direction.2", "direction.6"]
    for tensor, layer in zip(reader.tensors, (3, 7)):
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert tensor.shape.tolist() == [N_EMBD]  # ne: one dimension
        assert tensor.data.shape == (N_EMBD,)
        np.testing.assert_array_equal(tensor.data, vector.layers[layer][0])
    assert reader.get_field("pyactadd.layout").contents() == "vector"
    assert reader.get_field("pyactadd.layers.block_output").contents() == [2, 6]
    assert reader.get_field("pyactadd.layers.block_input").contents() == [3, 7]
    assert inspect_file(path)["llama_cpp"] == {"loadable": True, "reason": None}


def test_per_position_file_is_2d_with_ne_reversed(tmp_path: Path) -> None:
    vector = make_vector(5)
    path = tmp_path / "v.gguf"
    vector.save(path)
    reader = gguf.GGUFReader(path)
    tensor = reader.tensors[0]
    assert tensor.shape.tolist() == [N_EMBD, 5]  # ne[0] = n_embd
    assert tensor.data.shape == (5, N_EMBD)
    assert reader.get_field("pyactadd.layout").contents() == "per_position"
    assert reader.get_field("pyactadd.n_positions").contents() == 5
    info = inspect_file(path)
    assert info["layout"] == "per_position" and info["producer"] == "pyactadd" and info["format_version"] == 1
    assert {k: info["layers"][k] for k in ("block_input", "block_output")} == {"block_input": [3, 7], "block_output": [2, 6]}
    assert {k: info["tensors"][0][k] for k in ("name", "type", "shape")} == {"name": "direction.2", "type": "F32", "shape": [5, N_EMBD]}
    assert info["llama_cpp"]["loadable"] is False


def test_stock_llama_cpp_file_loads_as_all_aligned(tmp_path: Path) -> None:
    path = stock_file(tmp_path / "stock.gguf")
    vector = SteeringVector.load(path)
    assert vector.layer_ids == [6]
    assert vector.alignment == "all"
    assert vector.source == "llama.cpp"
    assert vector.n_positions == 1
    assert vector.coefficient == 1.0
    assert vector.fingerprint == ModelFingerprint("llama", N_EMBD, None, None)
    assert vector.model_hint == "llama"
    np.testing.assert_array_equal(vector.layers[6][0], np.arange(N_EMBD, dtype=np.float32) / 10)
    info = inspect_file(path)
    # A stock file (source "llama.cpp"); gguf-py with only these keys is repeng's layout.
    assert info["producer"] == "repeng" and info["format_version"] is None and info["layout"] == "vector"


def test_stock_file_checks_only_width_and_layers(tmp_path: Path) -> None:
    vector = SteeringVector.load(stock_file(tmp_path / "stock.gguf", hint="mistral"))
    vector.check_fits(ModelFingerprint("llama", N_EMBD, 32, 32000))  # repeng-style hint is ignored
    with pytest.raises(ModelMismatchError, match="n_embd 16"):
        vector.check_fits(ModelFingerprint("llama", 32, 32, 32000))
    with pytest.raises(ModelMismatchError, match="layer 6"):
        vector.check_fits(ModelFingerprint("llama", N_EMBD, 6, 32000))


def test_f16_tensors_are_converted(tmp_path: Path) -> None:
    data = (np.arange(N_EMBD) / 4).astype(np.float16)
    vector = SteeringVector.load(stock_file(tmp_path / "f16.gguf", {"direction.1": data}))
    assert vector.layers[2].dtype == np.float32
    np.testing.assert_array_equal(vector.layers[2][0], data.astype(np.float32))


# ---------------------------------------------------------------------------------------
# The value object


def test_construction_normalises_arrays() -> None:
    vector = SteeringVector({4: np.ones(N_EMBD, dtype=np.float64)}, FINGERPRINT)
    assert vector.layers[4].shape == (1, N_EMBD) and vector.layers[4].dtype == np.float32
    assert vector.n_positions == 1 and vector.n_embd == N_EMBD
    assert vector.model_hint == "llama"
    assert "n_positions=1" in repr(vector)


@pytest.mark.parametrize(
    "layers, message",
    [
        ({}, "at least one layer"),
        ({0: np.ones((1, N_EMBD))}, "out of range"),
        ({30: np.ones((1, N_EMBD))}, "use 1 to 29"),
        ({"3": np.ones((1, N_EMBD))}, "integers"),
        ({3: np.ones((1, 8))}, "n_embd 8"),
        ({3: np.ones((2, N_EMBD)), 4: np.ones((3, N_EMBD))}, "same number of rows"),
        ({3: np.ones((1, 1, N_EMBD))}, "shape"),
        ({3: np.ones((1, N_EMBD), dtype=np.int32)}, "floating-point"),
    ],
)
def test_construction_rejects_bad_layers(layers, message: str) -> None:
    with pytest.raises(InputError, match=message):
        SteeringVector(layers, FINGERPRINT)


def test_construction_rejects_bad_fields() -> None:
    with pytest.raises(InputError, match="alignment"):
        make_vector(alignment="middle")
    with pytest.raises(InputError, match="empty"):
        make_vector(positive_ids=[])
    with pytest.raises(InputError, match="extra"):
        make_vector(extra={"x": [1, 2]})
    with pytest.raises(InputError, match="coefficient"):
        make_vector(coefficient=math.inf)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_construction_names_layer_and_row_of_non_finite_value(bad: float) -> None:
    rows = np.zeros((3, N_EMBD), dtype=np.float32)
    rows[2, 5] = bad
    with pytest.raises(SteeringFileError, match="layer 7 row 2"):
        SteeringVector({3: np.zeros((3, N_EMBD)), 7: rows}, FINGERPRINT)


def test_scaling_returns_new_vectors_and_updates_coefficient() -> None:
    vector = make_vector(coefficient=2.0)
    original = {layer: rows.copy() for layer, rows in vector.layers.items()}
    for scaled, factor in ((vector * 3, 3), (3 * vector, 3), (np.float32(3) * vector, 3), (-vector, -1), (vector / 4, 0.25)):
        assert isinstance(scaled, SteeringVector)
        assert scaled.coefficient == pytest.approx(2.0 * factor)
        for layer in vector.layer_ids:
            np.testing.assert_allclose(scaled.layers[layer], original[layer] * factor, rtol=1e-6)
        assert scaled.positive == vector.positive and scaled.fingerprint == vector.fingerprint
    for layer, rows in vector.layers.items():
        np.testing.assert_array_equal(rows, original[layer])
    assert vector.coefficient == 2.0
    with pytest.raises(InputError, match="zero"):
        vector / 0
    with pytest.raises(TypeError):
        vector * "2"


def test_scaling_past_float32_is_named_as_an_overflow() -> None:
    vector = make_vector()
    peak = max(float(np.abs(rows).max()) for rows in vector.layers.values())
    with pytest.raises(InputError, match=r"coefficient 1e\+39 overflows float32 .*use a smaller coefficient"):
        vector * 1e39
    factor = 2 * 3.4e38 / peak  # within float32 itself, but not once multiplied into the rows
    with pytest.raises(InputError, match=r"overflows float32 when it scales the vector at layer 3 .*use a coefficient of at most"):
        vector * factor
    with pytest.raises(InputError, match="coefficient must be a finite number"):
        vector * math.inf
    assert np.isfinite((vector * (0.5 * 3.4e38 / peak)).layers[3]).all()


def test_adding_unions_layers_and_zero_pads_at_the_end() -> None:
    short = make_vector(2, layers=(3,), seed=1, positive="a")
    long = make_vector(4, layers=(3, 7), seed=2, positive="b")
    total = short + long
    assert total.layer_ids == [3, 7] and total.n_positions == 4
    expected = long.layers[3].copy()
    expected[:2] += short.layers[3]
    np.testing.assert_allclose(total.layers[3], expected)
    np.testing.assert_array_equal(total.layers[7], long.layers[7])
    assert total.positive is None  # describes neither operand

    difference = long - short
    expected = long.layers[3].copy()
    expected[:2] -= short.layers[3]
    np.testing.assert_allclose(difference.layers[3], expected)
    np.testing.assert_allclose((short - short).layers[3], 0)


def test_adding_back_aligned_vectors_pads_at_the_start() -> None:
    short = make_vector(2, layers=(3,), seed=1, alignment="back")
    long = make_vector(4, layers=(3,), seed=2, alignment="back")
    expected = long.layers[3].copy()
    expected[2:] += short.layers[3]
    np.testing.assert_allclose((short + long).layers[3], expected)


def test_adding_requires_same_model_and_alignment() -> None:
    other_model = ModelFingerprint("gemma3", N_EMBD, 30, 49152)
    with pytest.raises(ModelMismatchError, match="architecture llama != gemma3"):
        make_vector() + make_vector(fingerprint=other_model)
    with pytest.raises(InputError, match="aligned"):
        make_vector(alignment="front") + make_vector(alignment="back")
    unknown = ModelFingerprint(None, N_EMBD, None, None)
    total = make_vector() + make_vector(fingerprint=unknown)  # unknown fields match anything
    assert total.fingerprint == FINGERPRINT


def test_row_norms() -> None:
    rows = np.zeros((2, N_EMBD), dtype=np.float32)
    rows[0, :2] = [3, 4]
    norms = SteeringVector({5: rows}, FINGERPRINT).row_norms()
    np.testing.assert_allclose(norms[5], [5.0, 0.0])


def test_fingerprint_mismatch_and_check_fits() -> None:
    assert FINGERPRINT.mismatch(ModelFingerprint("llama", N_EMBD, None, None)) is None
    assert FINGERPRINT.mismatch(ModelFingerprint("llama", N_EMBD, 30, 32000)) == "n_vocab 49152 != 32000"
    vector = make_vector()
    vector.check_fits(FINGERPRINT)
    with pytest.raises(ModelMismatchError) as excinfo:
        vector.check_fits(ModelFingerprint("gemma3", 640, 26, 262144))
    message = str(excinfo.value)
    assert message.startswith("steering vector was made for llama with n_embd 16, n_layer 30")
    assert "but the model is gemma3 with n_embd 640" in message
    assert message.endswith("extract a vector on this model") and "\n" not in message


# ---------------------------------------------------------------------------------------
# Bad files


def assert_steering_error(path: Path, *fragments: str) -> SteeringFileError:
    with pytest.raises(SteeringFileError) as excinfo:
        SteeringVector.load(path)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return excinfo.value


def test_missing_file(tmp_path: Path) -> None:
    assert_steering_error(tmp_path / "nope.gguf", "no such file", "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    assert_steering_error(tmp_path, "is a directory")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty"),
        (b"hello, this is not a gguf file at all", "not a GGUF file"),
        (bytes(range(256)) * 4, "not a GGUF file"),
        (b"GGUF", "truncated"),
        (b"GGUF" + struct.pack("<I", 99) + bytes(16), "version 99"),
    ],
)
def test_garbage_bytes(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    assert_steering_error(path, fragment, str(path))


@pytest.mark.parametrize("n_positions", [1, 3])
def test_truncation_is_a_steering_error(tmp_path: Path, n_positions: int) -> None:
    good = tmp_path / "good.gguf"
    full_vector(n_positions).save(good)
    data = good.read_bytes()
    cut_file = tmp_path / "cut.gguf"
    # Every cut in the fixed header, then a stride that lands inside every field and tensor.
    cuts = sorted(set(range(64)) | set(range(64, len(data), 7)) | set(range(len(data) - 8, len(data))))
    for cut in cuts:
        cut_file.write_bytes(data[:cut])
        assert_steering_error(cut_file)


def _patch_float(path: Path, tensor_index: int, row: int, column: int, value: float) -> None:
    tensor = gguf.GGUFReader(path).tensors[tensor_index]
    offset = tensor.data_offset + 4 * (row * N_EMBD + column)
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, offset, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_name_tensor_and_row(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "v.gguf"
    make_vector(4).save(path)
    _patch_float(path, tensor_index=1, row=2, column=9, value=bad)
    assert_steering_error(path, "direction.6", "row 2")


def test_non_finite_value_in_stock_file(tmp_path: Path) -> None:
    data = np.zeros(N_EMBD, dtype=np.float32)
    data[3] = np.nan
    assert_steering_error(stock_file(tmp_path / "s.gguf", {"direction.4": data}), "direction.4", "row 0")


def test_wrong_architecture(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.gguf", "llama", {}, {"direction.1": np.zeros(N_EMBD, dtype=np.float32)})
    assert_steering_error(path, "is a model file (architecture llama), not a steering file")


def test_model_like_gguf(tmp_path: Path) -> None:
    kv = {
        "llama.block_count": (2, GGUFValueType.UINT32),
        "llama.embedding_length": (N_EMBD, GGUFValueType.UINT32),
        "tokenizer.ggml.tokens": (["<s>", "a", "b"], GGUFValueType.ARRAY, GGUFValueType.STRING),
    }
    tensors = {
        "token_embd.weight": np.zeros((3, N_EMBD), dtype=np.float32),
        "blk.0.attn_q.weight": np.zeros((N_EMBD, N_EMBD), dtype=np.float16),
    }
    assert_steering_error(write_raw(tmp_path / "model.gguf", "llama", kv, tensors), "model file (architecture llama)")


def test_no_architecture_key(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.kv_data[0].clear()  # gguf-py always adds general.architecture; remove it to craft the file
    writer.add_tensor("direction.1", np.zeros(N_EMBD, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_steering_error(path, "no general.architecture")


@pytest.mark.parametrize(
    "tensors, fragment",
    [
        ({}, "no direction tensors"),
        ({"foo": np.zeros(N_EMBD, dtype=np.float32)}, "tensor named 'foo'"),
        ({"direction.x": np.zeros(N_EMBD, dtype=np.float32)}, "tensor named 'direction.x'"),
        ({"direction.1": np.zeros(N_EMBD, dtype=np.int32)}, "type I32"),
        ({"direction.1": np.zeros(N_EMBD, dtype=np.float32), "direction.2": np.zeros(8, dtype=np.float32)}, "n_embd 8"),
        ({"direction.1": np.zeros((2, N_EMBD), dtype=np.float32)}, "2-D"),
        ({"direction.1": np.zeros((1, 2, N_EMBD), dtype=np.float32)}, "3 dimensions"),
    ],
)
def test_bad_stock_tensors(tmp_path: Path, tensors: dict, fragment: str) -> None:
    kv = {"controlvector.model_hint": ("llama", GGUFValueType.STRING)}
    assert_steering_error(write_raw(tmp_path / "x.gguf", "controlvector", kv, tensors), fragment)


def test_layer_count_must_match(tmp_path: Path) -> None:
    kv = {"controlvector.layer_count": (3, GGUFValueType.UINT32)}
    path = write_raw(tmp_path / "x.gguf", "controlvector", kv, {"direction.1": np.zeros(N_EMBD, dtype=np.float32)})
    assert_steering_error(path, "layer_count is 3")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"pyactadd.layers.block_output": ([2, 5], GGUFValueType.ARRAY, GGUFValueType.INT32)}, "block_output is [2, 5]"),
        ({"pyactadd.layers.block_input": ([3, 6], GGUFValueType.ARRAY, GGUFValueType.INT32)}, "block_input"),
        ({"pyactadd.n_positions": (2, GGUFValueType.UINT32)}, "n_positions is 2"),
        ({"pyactadd.layout": ("vector", GGUFValueType.STRING)}, "layout"),
        ({"pyactadd.model.n_embd": (32, GGUFValueType.UINT32)}, "n_embd is 32"),
        ({"pyactadd.format_version": (2, GGUFValueType.UINT32)}, "upgrade pyactadd"),
        ({"pyactadd.alignment": (5, GGUFValueType.UINT32)}, "should be a string"),
        ({"pyactadd.alignment": ("sideways", GGUFValueType.STRING)}, "alignment"),
        ({"pyactadd.model.n_layer": (5, GGUFValueType.UINT32)}, "invalid steering vector"),
    ],
)
def test_inconsistent_pyactadd_metadata(tmp_path: Path, overrides: dict, fragment: str) -> None:
    path = write_with_overrides(tmp_path / "x.gguf", make_vector(3), overrides)
    assert_steering_error(path, fragment)


def test_missing_pyactadd_key(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    gguf_format._add_metadata(writer, make_vector(1))
    del writer.kv_data[0]["pyactadd.alignment"]
    writer.add_tensor("direction.2", np.zeros(N_EMBD, dtype=np.float32))
    writer.add_tensor("direction.6", np.zeros(N_EMBD, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_steering_error(path, "lacks pyactadd.alignment")


def test_corrupt_array_length_fails_fast(tmp_path: Path) -> None:
    # GGUFReader alone loops ~2**40 times on this; the structural pre-check stops it.
    path = tmp_path / "v.gguf"
    make_vector(1, positive_ids=[1, 2, 3]).save(path)
    data = bytearray(path.read_bytes())
    key = b"pyactadd.tokens.positive"
    length_at = data.index(key) + len(key) + 4 + 4  # after the value type and the item type
    assert struct.unpack_from("<Q", data, length_at) == (3,)
    struct.pack_into("<Q", data, length_at, 2**40)
    path.write_bytes(bytes(data))
    assert_steering_error(path, "runs past the end of the file")


# ---------------------------------------------------------------------------------------
# Writing failures


def test_saving_non_finite_vector_leaves_no_file(tmp_path: Path) -> None:
    vector = make_vector()
    vector.layers[7][1, 0] = np.nan  # arrays stay mutable after validation
    target = tmp_path / "v.gguf"
    with pytest.raises(SteeringFileError, match="layer 7 row 1"):
        vector.save(target)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "v.gguf"
    make_vector(seed=1).save(target)
    before = target.read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(SteeringFileError, match="No space left on device"):
        make_vector(seed=2).save(target)
    assert os.listdir(tmp_path) == ["v.gguf"]
    assert target.read_bytes() == before

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda self, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        make_vector(seed=2).save(target)
    assert os.listdir(tmp_path) == ["v.gguf"]


def test_save_to_bad_locations(tmp_path: Path) -> None:
    with pytest.raises(SteeringFileError, match="does not exist"):
        make_vector().save(tmp_path / "missing" / "v.gguf")
    with pytest.raises(SteeringFileError, match="is a directory"):
        make_vector().save(tmp_path)
    with pytest.raises(InputError):
        write_steering_file("not a vector", tmp_path / "v.gguf")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "v.gguf"
    make_vector(seed=1).save(target)
    loaded = SteeringVector.load(target)
    second = make_vector(2, seed=2)
    second.save(target)
    assert SteeringVector.load(target) == second
    assert loaded == make_vector(seed=1)


# ---------------------------------------------------------------------------------------
# Random corruption

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "v.gguf"
    full_vector(3).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corrupt") / "c.gguf"


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_loads_or_raises_steering_error(valid_bytes: bytes, scratch: Path, data) -> None:
    header_end = valid_bytes.index(b"direction.") + 64  # most structure lives before the tensor data
    corrupted = bytearray(valid_bytes)
    edits = data.draw(
        st.lists(
            st.tuples(
                st.one_of(st.integers(0, header_end), st.integers(0, len(valid_bytes) - 1)),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=8,
        )
    )
    for index, byte in edits:
        corrupted[index] = byte
    if data.draw(st.booleans()):
        corrupted = corrupted[: data.draw(st.integers(0, len(corrupted)))]
    scratch.write_bytes(bytes(corrupted))
    try:
        result = SteeringVector.load(scratch)
    except SteeringFileError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(result, SteeringVector)
