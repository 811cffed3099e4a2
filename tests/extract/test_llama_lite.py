"""The transformers-free llama forward (warm extraction path) against transformers itself."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pyactadd.extract.llama_lite import LlamaLite, supports
from pyactadd.extract.torch_model import load_torch_model
from helpers.forward_check import assert_same_forward


@pytest.fixture(scope="module")
def cache_entry(default_model_path):
    from pyactadd.extract import torch_model

    load_torch_model(default_model_path, progress=False)  # makes sure the cache entry exists
    entries = [p for p in (torch_model.cache_root() / "torch").iterdir() if (p / "config.json").is_file()]
    llama_entries = [p for p in entries if json.loads((p / "config.json").read_text())["model_type"] == "llama"]
    assert llama_entries, entries
    return llama_entries[0]


def test_every_hidden_state_equals_transformers(cache_entry):
    lite = LlamaLite.from_dir(cache_entry)
    reference = AutoModelForCausalLM.from_pretrained(str(cache_entry), dtype=torch.float32).eval()
    assert_same_forward(lite, reference)


def test_default_model_loads_without_transformers(default_model_path, cache_entry):
    from pyactadd.extract.torch_model import clear_loaded_model

    # The very first load in a fresh cache returns transformers' converted model; later
    # loads come from the cache entry through LlamaLite.
    clear_loaded_model()
    assert type(load_torch_model(default_model_path, progress=False)).__name__ == "LlamaLite"


def test_unsupported_configs_fall_back():
    base = {"model_type": "llama", "hidden_act": "silu", "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    assert supports(base)
    assert not supports({**base, "model_type": "gemma3_text"})
    assert not supports({**base, "attention_bias": True})
    assert not supports({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3"}})
    assert not supports({**base, "hidden_act": "gelu"})
