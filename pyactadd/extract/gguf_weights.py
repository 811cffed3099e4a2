"""Convert a llama-architecture GGUF file to a float32 Hugging Face checkpoint without transformers.

transformers' GGUF loader is slow even for a small model, and almost none of its time
goes to the weights: it parses the file twice with ``gguf.GGUFReader`` (which builds a
numpy view for every vocabulary string), rebuilds gguf's tensor-name map once per
module of the model, and imports most of itself. For the plain llama
architecture the conversion is small enough to do directly: read the header once (only
the scalar metadata; arrays are skipped), dequantize each tensor with the same
``gguf.quants.dequantize`` transformers calls, rename it, and undo llama.cpp's Q/K row
permutation exactly as transformers' ``LlamaTensorProcessor`` does. The result is
bit-identical to transformers' own conversion (``tests/extract/test_gguf_weights.py`` checks
every tensor and the config), and it is written in the layout ``save_pretrained``
writes, so both :mod:`pyactadd.extract.llama_lite` and transformers load it.

Files this module does not reproduce exactly (other architectures, extra tensors such
as biases or ``rope_freqs``, unusual metadata) raise :class:`Unsupported` from
:func:`read_plan`, and the caller uses transformers instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyactadd import gguf_header
from pyactadd.extract.gguf_tensors import dequantizable_types
from pyactadd.gguf_header import SkippedArray, TensorInfo

if TYPE_CHECKING:
    import numpy as np
    import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# llama.cpp tensor name -> transformers LlamaForCausalLM parameter name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(0|[1-9][0-9]*)\.([a-z_]+)\.weight")


class Unsupported(Exception):
    """The file is not one this module converts exactly as transformers would; use transformers."""


# A metadata array, kept only as its length: the converter never needs array contents.
_ArrayValue = SkippedArray


@dataclass
class ConversionPlan:
    """What :func:`convert` will do for one file: the transformers config and the tensors to read."""

    path: Path
    config: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def n_parameters(self) -> int:
        """Total number of weights."""
        return sum(info.n_elements for info in self.tensors)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Read a GGUF file's scalar metadata and its tensor table (no tensor data).

    The shared, checked reader (:mod:`pyactadd.gguf_header`) with arrays skipped: they are
    returned as their length only, so the vocabulary costs a walk over string lengths.

    Raises:
        Unsupported: not a little-endian GGUF v2/v3 file, or malformed.
    """
    try:
        header = gguf_header.read_header(path, arrays=False)
    except gguf_header.NotGGUF:
        raise Unsupported("not a GGUF file") from None
    except gguf_header.UnsupportedVersion as exc:
        raise Unsupported(f"GGUF version {exc.version}") from None
    except gguf_header.MalformedGGUF as exc:
        raise Unsupported(f"unreadable GGUF header ({exc})") from None
    if header.byte_order != "<":
        raise Unsupported("a big-endian GGUF file")
    # Floats come back as Python floats of the stored float32, as transformers reads them.
    return {key: item.value for key, item in header.metadata.items()}, header.tensors


def read_plan(path: str | os.PathLike[str]) -> ConversionPlan:
    """Check that ``path`` is a plain llama GGUF this module converts exactly, and plan the conversion.

    The config is the one transformers (``load_gguf_checkpoint`` + ``LlamaConfig`` +
    ``save_pretrained``) writes for the file, plus ``rope_theta`` and ``torch_dtype`` at
    top level so transformers < 5 reads it the same way.

    Raises:
        Unsupported: another architecture, a tensor or metadata value outside the plain
            llama layout, or a quantization type gguf cannot dequantize.
    """
    path = Path(path)
    fields, tensors = read_header(path)
    _check_architecture(fields)
    sizes = _sizes(fields)
    _check_tensors(tensors, _expected_shapes(sizes))
    tied = all(info.name != "output.weight" for info in tensors)
    return ConversionPlan(path=path, config=_config(fields, sizes, tied=tied), tensors=tensors)


@dataclass(frozen=True)
class _Sizes:
    """The llama hyperparameters the tensor shapes and the config follow from."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int


def _integer(fields: dict[str, Any], key: str, default: int | None = None) -> int:
    got = fields.get(f"llama.{key}", default)
    if not isinstance(got, int) or isinstance(got, bool) or got <= 0:
        raise Unsupported(f"llama.{key} is {got!r}")
    return got


def _number(fields: dict[str, Any], key: str) -> float:
    got = fields.get(f"llama.{key}")
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        raise Unsupported(f"llama.{key} is {got!r}")
    return float(got)


def _check_architecture(fields: dict[str, Any]) -> None:
    if fields.get("general.architecture") != "llama":
        raise Unsupported(f"architecture {fields.get('general.architecture')!r}")
    name = fields.get("general.name")
    # transformers turns some llama-architecture files into model_type "mistral" by name.
    if isinstance(name, str) and "mistral" in name.lower():
        raise Unsupported("a Mistral model (transformers converts it as mistral)")
    if fields.get("llama.expert_count", 0):
        raise Unsupported("a mixture-of-experts model")


def _sizes(fields: dict[str, Any]) -> _Sizes:
    n_layer = _integer(fields, "block_count")
    n_embd = _integer(fields, "embedding_length")
    n_head = _integer(fields, "attention.head_count")
    # Without head_count_kv transformers skips the Q/K un-permutation altogether; leave that case to it.
    n_head_kv = _integer(fields, "attention.head_count_kv")
    head_dim = _integer(fields, "rope.dimension_count", n_embd // n_head)
    n_ff = _integer(fields, "feed_forward_length")
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = _integer(fields, "vocab_size", tokens.count if isinstance(tokens, SkippedArray) else None)
    if n_head % n_head_kv or head_dim % 2:
        raise Unsupported(f"{n_head} heads, {n_head_kv} KV heads, head_dim {head_dim}")
    return _Sizes(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab)


def _expected_shapes(sizes: _Sizes) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the plain llama layout, with its shape (row-major, as transformers holds it)."""
    n_embd, n_ff, n_vocab = sizes.n_embd, sizes.n_ff, sizes.n_vocab
    q_rows, kv_rows = sizes.n_head * sizes.head_dim, sizes.n_head_kv * sizes.head_dim
    expected = {
        "token_embd.weight": (n_vocab, n_embd),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_vocab, n_embd),
    }
    for block in range(sizes.n_layer):
        for gguf_name, shape in (
            ("attn_norm", (n_embd,)),
            ("attn_q", (q_rows, n_embd)),
            ("attn_k", (kv_rows, n_embd)),
            ("attn_v", (kv_rows, n_embd)),
            ("attn_output", (n_embd, q_rows)),
            ("ffn_norm", (n_embd,)),
            ("ffn_gate", (n_ff, n_embd)),
            ("ffn_up", (n_ff, n_embd)),
            ("ffn_down", (n_embd, n_ff)),
        ):
            expected[f"blk.{block}.{gguf_name}.weight"] = shape
    return expected


def _check_tensors(tensors: list[TensorInfo], expected: dict[str, tuple[int, ...]]) -> None:
    """Exactly the expected tensors (``output.weight`` optional: a tied head), each of its shape and a type gguf reads."""
    seen = {info.name for info in tensors}
    if len(seen) != len(tensors):
        raise Unsupported("duplicate tensor names")
    missing = sorted(set(expected) - seen - {"output.weight"})
    if missing:
        raise Unsupported(f"no tensor {missing[0]}")
    supported = dequantizable_types()
    for info in tensors:
        if info.name not in expected:
            raise Unsupported(f"tensor {info.name} is outside the plain llama layout")
        if tuple(reversed(info.dims)) != expected[info.name]:
            raise Unsupported(f"tensor {info.name} has dims {info.dims}")
        if info.ggml_type not in supported:
            raise Unsupported(f"tensor {info.name} has ggml type {info.ggml_type}")


def _config(fields: dict[str, Any], sizes: _Sizes, *, tied: bool) -> dict[str, Any]:
    """The config.json transformers writes for the file, keys sorted."""
    rope_theta = _number(fields, "rope.freq_base")
    config: dict[str, Any] = {}
    name = fields.get("general.name")
    if isinstance(name, str):
        config["_model_name_or_path"] = name
    config.update(
        {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "dtype": "float32",
            "head_dim": sizes.head_dim,
            "hidden_act": "silu",
            "hidden_size": sizes.n_embd,
            "initializer_range": 0.02,
            "intermediate_size": sizes.n_ff,
            "max_position_embeddings": _integer(fields, "context_length"),
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": sizes.n_head,
            "num_hidden_layers": sizes.n_layer,
            "num_key_value_heads": sizes.n_head_kv,
            "pretraining_tp": 1,
            "rms_norm_eps": _number(fields, "attention.layer_norm_rms_epsilon"),
            "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
            # transformers < 5 reads these two instead of rope_parameters and dtype.
            "rope_theta": rope_theta,
            "torch_dtype": "float32",
            # transformers ties the head to the embedding exactly when the file has no output.weight.
            "tie_word_embeddings": tied,
            "use_cache": True,
            "vocab_size": sizes.n_vocab,
        }
    )
    # Token ids transformers copies into the config; absent ones keep LlamaConfig's defaults.
    for gguf_key, config_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("unknown_token_id", "unk_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        token = fields.get(f"tokenizer.ggml.{gguf_key}")
        if isinstance(token, int) and not isinstance(token, bool):
            config[config_key] = token
    return dict(sorted(config.items()))


def convert(plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of ``plan`` into float32 torch tensors named as transformers names them.

    Each tensor goes through the same numpy operations as transformers' GGUF loader
    (``gguf.quants.dequantize``, then the Q/K reverse permutation), so the values are
    identical to transformers' conversion.
    """
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGML_QUANT_SIZES
    from gguf.quants import dequantize

    n_head = plan.config["num_attention_heads"]
    n_head_kv = plan.config["num_key_value_heads"]
    weights: dict[str, torch.Tensor] = {}
    # Plain reads rather than a memory map: each tensor's bytes are needed once, and no
    # view into the file may outlive the call.
    with open(plan.path, "rb") as handle:
        for info in plan.tensors:
            kind = GGMLQuantizationType(info.ggml_type)
            block_size, type_size = GGML_QUANT_SIZES[kind]
            n_bytes = info.n_elements * type_size // block_size
            shape = tuple(reversed(info.dims))
            handle.seek(info.offset)
            chunk = np.fromfile(handle, dtype=np.uint8, count=n_bytes)
            if chunk.size != n_bytes:
                raise ValueError(f"{plan.path.name}: tensor {info.name} runs past the end of the file")
            # The layout GGUFReader hands to dequantize: rows of raw blocks.
            values = dequantize(chunk.reshape(shape[:-1] + (shape[-1] // block_size * type_size,)), kind)
            if values.shape != shape:
                raise ValueError(f"{plan.path.name}: {info.name} dequantized to {values.shape}, expected {shape}")
            values = _reverse_permute(info.name, values, n_head, n_head_kv)
            # Usually a no-op: F32 tensors stay views of their own read buffer, which torch then keeps alive.
            weights[_hf_name(info.name)] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return weights


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    assert match is not None and match[2] in _BLOCK_NAMES, gguf_name  # read_plan admits no other names
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"


def _reverse_permute(gguf_name: str, weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permutation of Q and K rows.

    llama.cpp reorders each head's rows from "first half, second half" (transformers'
    rotate_half RoPE) to interleaved pairs; this is transformers'
    ``LlamaTensorProcessor._reverse_permute_weights``, operation for operation.
    """
    if ".attn_q." in gguf_name:
        heads = n_head
    elif ".attn_k." in gguf_name:
        heads = n_head_kv
    else:
        return weights
    dim = weights.shape[0] // heads // 2
    w = weights.reshape(heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def write_checkpoint(
    directory: str | os.PathLike[str], config: dict[str, Any], weights: dict[str, torch.Tensor]
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` as ``save_pretrained`` would.

    A tied head is not stored (transformers saves only the embedding). The caller makes
    the directory appear atomically.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    stored = dict(weights)
    if config.get("tie_word_embeddings"):
        stored.pop("lm_head.weight", None)
    # transformers refuses safetensors files without format "pt" in their metadata.
    save_file(stored, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
