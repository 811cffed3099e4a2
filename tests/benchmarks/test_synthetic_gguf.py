"""benchmarks/synthetic_gguf.py, on its tiny shape: the layout it promises, its cache, and
that llama.cpp loads the file and generates from it (what benchmarks/scale.py relies on at 8B).

The tiny file carries the default model's tokenizer, so it is cached under pyactadd's
cache directory and written only by the first session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize

from pyactadd.extract.torch_model import cache_root
from pyactadd.gguf_header import read_header
from helpers.scoring import next_token_logits

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def synthetic():
    """The benchmark's writer module, loaded from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("synthetic_gguf", BENCHMARKS / "synthetic_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(synthetic) -> Path:
    path = cache_root() / "tests" / "synthetic-tiny-q8_0.gguf"
    synthetic.write_synthetic(path, "tiny")
    return path


def tensor_data(path: Path, info) -> np.ndarray:
    """A tensor's bytes as gguf-py's dequantize takes them: one row of blocks per matrix row."""
    rows = info.shape[0] if len(info.shape) == 2 else 1
    return np.fromfile(path, dtype=np.uint8, count=info.n_bytes, offset=info.offset).reshape(rows, -1)


def test_tiny_layout(synthetic, tiny):
    spec = synthetic.SHAPES["tiny"]
    header = read_header(tiny, arrays=False)
    meta = {key: value.value for key, value in header.metadata.items()}
    tensors = {t.name: t for t in header.tensors}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == spec.n_layer
    assert meta["llama.attention.head_count_kv"] == spec.n_head_kv
    assert meta["llama.vocab_size"] == meta["tokenizer.ggml.tokens"].count == 49152
    assert len(tensors) == 2 + 9 * spec.n_layer and "output.weight" not in tensors  # tied head
    assert tensors["blk.0.ffn_down.weight"].dims == (spec.n_ff, spec.n_embd)  # ggml order
    assert tensors["blk.0.attn_q.weight"].ggml_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].ggml_type == GGMLQuantizationType.F32
    assert sum(t.n_elements for t in header.tensors) == synthetic.parameter_count(spec, 49152)
    gate = tensor_data(tiny, tensors["blk.0.ffn_gate.weight"])
    weights = dequantize(gate, GGMLQuantizationType.Q8_0)
    assert weights.shape == (spec.n_ff, spec.n_embd)
    assert abs(float(weights.std()) - synthetic.WEIGHT_STD) < 0.002
    last = tensor_data(tiny, tensors[f"blk.{spec.n_layer - 1}.ffn_gate.weight"])
    assert np.array_equal(gate, last)  # every block holds the same bytes


def test_cache_reuses_and_rewrites(synthetic, tiny, tmp_path):
    mtime = os.stat(tiny).st_mtime_ns
    again = synthetic.write_synthetic(tiny, "tiny")
    assert not again.written and os.stat(tiny).st_mtime_ns == mtime
    tokenizer = tmp_path / "tokenizer.gguf"  # a 64-token vocabulary: quick to copy
    writer = GGUFWriter(tokenizer, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(64)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    cut = tmp_path / "cut.gguf"
    first = synthetic.write_synthetic(cut, "tiny", tokenizer_from=tokenizer)
    cut.write_bytes(cut.read_bytes()[:1000])  # cut short under a valid stamp
    assert synthetic.write_synthetic(cut, "tiny", tokenizer_from=tokenizer).written
    assert os.path.getsize(cut) == first.size == json.loads(synthetic.stamp_path(cut).read_text())["size"]
    assert synthetic.write_synthetic(cut, "tiny", seed=1, tokenizer_from=tokenizer).written  # another seed
    assert not (tmp_path / "cut.gguf.tmp").exists()


def test_llama_cpp_loads_and_generates(tiny):
    from pyactadd.runtime.generate import load_llama

    llama = load_llama(tiny, n_ctx=64, n_threads=2)
    out = llama.create_completion("Love is", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] == 8
    logits = next_token_logits(llama, llama.tokenize(b"Love is"))
    assert np.isfinite(logits).all() and logits.std() > 0
