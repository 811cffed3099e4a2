"""The transformers-free GGUF conversion (pyactadd.extract.gguf_weights) against transformers' own conversion.

The default model is converted both ways once per module, each into its own temporary
cache root: transformers' entry is what ``load_torch_model`` wrote before the direct
path existed, the direct one is what a cold ``pyactadd extract`` writes now.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyactadd.extract import gguf_weights

from pyactadd.extract import torch_model
from pyactadd.extract.llama_lite import LlamaLite
from helpers.forward_check import assert_same_forward


def _entry_dir(root: Path, model_path: Path) -> Path:
    return torch_model.cache_entry(model_path, root=root)


@pytest.fixture(scope="module")
def transformers_conversion(default_model_path, tmp_path_factory):
    """(cache entry, in-memory model) of transformers' GGUF conversion of the default model (slow: once per module)."""
    root = tmp_path_factory.mktemp("transformers-cache")
    model = torch_model._convert_gguf(Path(default_model_path))
    entry = _entry_dir(root, Path(default_model_path))
    torch_model._write_entry(entry, source=default_model_path, save=lambda tmp: torch_model._save_pretrained(model, tmp))
    return entry, model


@pytest.fixture(scope="module")
def direct_conversion(default_model_path, tmp_path_factory):
    """(cache entry, returned model) of a cold load through the direct path, in an empty cache root."""
    root = tmp_path_factory.mktemp("direct-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(torch_model.CACHE_ENV, str(root))
        path = Path(default_model_path)
        # _load_gguf, not load_torch_model: the session's shared in-memory model stays untouched.
        model = torch_model._load_gguf(path, path.stat(), progress=False)
    entry = _entry_dir(root, Path(default_model_path))
    assert (entry / torch_model._DONE_FILE).is_file()
    return entry, model


def test_default_model_takes_the_direct_path(default_model_path, direct_conversion):
    from pyactadd.extract.llama_lite import supports

    plan = gguf_weights.read_plan(default_model_path)
    assert plan.n_parameters == 134_515_008
    assert supports(plan.config)
    entry, model = direct_conversion
    assert isinstance(model, LlamaLite)
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "model.safetensors", "pyactadd-converted.json"]


def test_weights_equal_transformers_conversion(transformers_conversion, direct_conversion):
    from safetensors.torch import load_file

    (theirs_entry, theirs_model), (ours_entry, ours_model) = transformers_conversion, direct_conversion
    theirs = load_file(str(theirs_entry / "model.safetensors"))
    ours = load_file(str(ours_entry / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 272  # tied head: no lm_head.weight stored, as save_pretrained does
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name
    # The in-memory models too (these include the tied lm_head).
    theirs_state, ours_state = theirs_model.state_dict(), ours_model.state_dict()
    assert sorted(ours_state) == sorted(theirs_state)
    for name, tensor in theirs_state.items():
        assert torch.equal(ours_state[name], tensor), name


def test_config_equals_transformers_conversion(transformers_conversion, direct_conversion):
    from transformers import AutoConfig

    theirs_entry, ours_entry = transformers_conversion[0], direct_conversion[0]
    theirs = json.loads((theirs_entry / "config.json").read_text())
    ours = json.loads((ours_entry / "config.json").read_text())
    # Every value transformers writes, written the same; the extras serve transformers < 5.
    assert set(ours) - set(theirs) == {"rope_theta", "torch_dtype"}
    assert set(theirs) - set(ours) == {"transformers_version"}
    assert {key: ours[key] for key in theirs if key in ours} == {key: theirs[key] for key in theirs if key in ours}
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    # And the config objects transformers builds from the two directories agree on everything.
    loaded = [AutoConfig.from_pretrained(str(entry)).to_dict() for entry in (theirs_entry, ours_entry)]
    for config in loaded:
        config.pop("_name_or_path")
    assert loaded[0] == loaded[1]


def test_hidden_states_equal_transformers(transformers_conversion, direct_conversion):
    lite = LlamaLite.from_dir(direct_conversion[0])
    reference = transformers_conversion[1]
    assert_same_forward(lite, reference)


def test_direct_entry_loads_in_transformers(direct_conversion):
    # _load_hf_dir refuses a checkpoint with missing weights.
    model = torch_model._load_hf_dir(direct_conversion[0])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rope_parameters == {"rope_theta": 100000.0, "rope_type": "default"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert isinstance(torch_model._load_cached(direct_conversion[0]), LlamaLite)


def test_extract_output_identical_with_either_cache(default_model_path, transformers_conversion, tmp_path, monkeypatch):
    """A cold extract (direct conversion) writes the same file as one on transformers' converted cache."""
    from pyactadd.extract.pipeline import extract

    outputs = []
    cold_root = tmp_path / "cold"
    for root in (cold_root, transformers_conversion[0].parent.parent):
        monkeypatch.setenv(torch_model.CACHE_ENV, str(root))
        torch_model.clear_loaded_model()
        vector = extract("Love", "Hate", [6], model=default_model_path)
        out = tmp_path / f"{len(outputs)}.gguf"
        vector.save(out)
        outputs.append(out.read_bytes())
    torch_model.clear_loaded_model()  # later tests reload the default model from their own cache
    assert (_entry_dir(cold_root, Path(default_model_path)) / "model.safetensors").is_file()
    assert outputs[0] == outputs[1]


# --- files the direct path must leave to transformers, and a small untied one it converts ---


def _write_tiny_llama(path: Path, *, architecture: str = "llama", name: str = "tiny", extra_tensor: str | None = None) -> None:
    """A 2-block llama GGUF with an untied head, F32/F16/Q8_0 tensors and 4 query heads over 2 KV heads."""
    import gguf

    rng = np.random.default_rng(0)
    n_embd, n_head, n_kv, n_ff, n_vocab, n_layer = 64, 4, 2, 128, 40, 2
    head_dim = n_embd // n_head
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    prefix = architecture
    writer.add_uint32(f"{prefix}.block_count", n_layer)
    writer.add_uint32(f"{prefix}.context_length", 256)
    writer.add_uint32(f"{prefix}.embedding_length", n_embd)
    writer.add_uint32(f"{prefix}.feed_forward_length", n_ff)
    writer.add_uint32(f"{prefix}.attention.head_count", n_head)
    writer.add_uint32(f"{prefix}.attention.head_count_kv", n_kv)
    writer.add_uint32(f"{prefix}.rope.dimension_count", head_dim)
    writer.add_float32(f"{prefix}.rope.freq_base", 10000.0)
    writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(n_vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(tensor_name: str, shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> None:
        values = rng.standard_normal(shape).astype(np.float32)
        if kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, values.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, values)
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    f32, f16, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", (n_vocab, n_embd), q8)
    for block in range(n_layer):
        add(f"blk.{block}.attn_norm.weight", (n_embd,), f32)
        add(f"blk.{block}.attn_q.weight", (n_embd, n_embd), q8)
        add(f"blk.{block}.attn_k.weight", (n_kv * head_dim, n_embd), f16)
        add(f"blk.{block}.attn_v.weight", (n_kv * head_dim, n_embd), q8)
        add(f"blk.{block}.attn_output.weight", (n_embd, n_embd), f16)
        add(f"blk.{block}.ffn_norm.weight", (n_embd,), f32)
        add(f"blk.{block}.ffn_gate.weight", (n_ff, n_embd), q8)
        add(f"blk.{block}.ffn_up.weight", (n_ff, n_embd), f32)
        add(f"blk.{block}.ffn_down.weight", (n_embd, n_ff), q8)
    add("output_norm.weight", (n_embd,), f32)
    add("output.weight", (n_vocab, n_embd), f16)
    if extra_tensor:
        add(extra_tensor, (n_embd,), f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_untied_model_equals_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path)
    plan = gguf_weights.read_plan(path)
    assert plan.config["tie_word_embeddings"] is False
    ours = gguf_weights.convert(plan)
    with torch_model._quiet_transformers():
        reference = AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, device_map=None, **torch_model._float32_kwargs()
        )
    theirs = reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    (tmp_path / "entry").mkdir()
    gguf_weights.write_checkpoint(tmp_path / "entry", plan.config, ours)
    lite = LlamaLite.from_dir(tmp_path / "entry")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.inference_mode():
        assert torch.allclose(lite(input_ids=ids).logits, reference(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant, reason",
    [
        ({"architecture": "qwen2"}, "architecture"),
        ({"name": "Mistral 7B"}, "Mistral"),
        ({"extra_tensor": "blk.0.attn_q.bias"}, "outside the plain llama layout"),
        ({"extra_tensor": "rope_freqs.weight"}, "outside the plain llama layout"),
    ],
)
def test_other_files_are_left_to_transformers(tmp_path, variant, reason):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, **variant)
    with pytest.raises(gguf_weights.Unsupported, match=reason):
        gguf_weights.read_plan(path)
    assert torch_model._direct_plan(path) is None


@pytest.mark.parametrize(
    "content", [b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"\x07", b"GGUF" + struct.pack("<IQQ", 1, 0, 0), b"GGML" + bytes(20)]
)
def test_malformed_files_are_left_to_transformers(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(gguf_weights.Unsupported):
        gguf_weights.read_plan(path)
