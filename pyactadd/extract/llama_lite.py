"""A torch-only forward pass for llama-architecture checkpoints, so warm extraction skips transformers.

Importing transformers and building its model class is most of a warm ``pyactadd
extract`` (docs/performance.md). Extraction only needs block inputs, so for the plain
llama architecture (default RoPE, no biases, SiLU MLP: SmolLM2, Llama, Mistral-style
checkpoints) this module rebuilds the forward pass from the cached float32 safetensors
with torch alone. Module names and the block structure mirror transformers'
``LlamaForCausalLM`` (``model.layers[i]`` takes the residual stream as its first
argument), so forward pre-hooks see exactly what they see in transformers;
``tests/extract/test_llama_lite.py`` checks every hidden state against transformers itself.
Anything this class does not reproduce exactly is refused by :func:`supports`, and the
caller falls back to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_FILE = "model.safetensors"


def supports(config: dict[str, Any]) -> bool:
    """True when ``config`` (a transformers config.json) describes a model this forward reproduces exactly."""
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        return False
    return (
        config.get("model_type") == "llama"
        and config.get("hidden_act") == "silu"
        and not config.get("attention_bias", False)
        and not config.get("mlp_bias", False)
        and config.get("pretraining_tp", 1) == 1
        and isinstance(rope.get("rope_theta", config.get("rope_theta")), (int, float))
    )


def _param(weights: dict[str, torch.Tensor], name: str) -> nn.Parameter:
    try:
        return nn.Parameter(weights[name], requires_grad=False)
    except KeyError:
        raise ValueError(f"checkpoint lacks {name}") from None


# Modules take their weights at construction: building nn.Linear first would waste time
# on random initialisation (or on importing the meta-device machinery).
class _Linear(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.weight = _param(weights, prefix + ".weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _RMSNorm(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, eps: float) -> None:
        super().__init__()
        self.weight = _param(weights, prefix + ".weight")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_head
        self.head_dim = _head_dim(cfg)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, _Linear(weights, f"{prefix}.{name}"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = self.n_head // self.n_kv
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class _MLP(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, _Linear(weights, f"{prefix}.{name}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any]) -> None:
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = _RMSNorm(weights, prefix + ".input_layernorm", eps)
        self.self_attn = _Attention(weights, prefix + ".self_attn", cfg)
        self.post_attention_layernorm = _RMSNorm(weights, prefix + ".post_attention_layernorm", eps)
        self.mlp = _MLP(weights, prefix + ".mlp")

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class _Embedding(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.weight = _param(weights, prefix + ".weight")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class _Body(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = _Embedding(weights, "model.embed_tokens")
        self.layers = nn.ModuleList(_Block(weights, f"model.layers.{i}", cfg) for i in range(cfg["num_hidden_layers"]))
        self.norm = _RMSNorm(weights, "model.norm", cfg["rms_norm_eps"])


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _rope_inv_freq(cfg: dict[str, Any]) -> torch.Tensor:
    """RoPE inverse frequencies, computed exactly as transformers' default rope does."""
    head_dim = _head_dim(cfg)
    theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta")))
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class LlamaLite(nn.Module):
    """transformers' LlamaForCausalLM forward pass (inference only, float32, no KV cache)."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = SimpleNamespace(**cfg)
        if cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in weights:
            weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
        self.model = _Body(weights, cfg)
        self.lm_head = _Linear(weights, "lm_head")
        self._inv_freq = _rope_inv_freq(cfg)
        unused = sorted(set(weights) - set(self.state_dict()))
        if unused:
            raise ValueError(f"checkpoint has weights this forward pass would ignore, e.g. {unused[0]}")

    @classmethod
    def from_dir(cls, directory: str | Path) -> "LlamaLite":
        """Build the model from a transformers-format directory with one ``model.safetensors``.

        Raises:
            ValueError: the config is not one :func:`supports`, or weights are missing.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if not supports(cfg):
            raise ValueError(f"{directory} is not a plain llama checkpoint")
        return cls(load_file(str(directory / WEIGHTS_FILE)), cfg).eval()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (transformers' API, used to read n_embd)."""
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, output_hidden_states: bool = False, **_: Any):
        """Logits for every position; with ``output_hidden_states``, every block input and the final norm's input."""
        hidden = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32)
        freqs = positions[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        states = []
        for block in self.model.layers:
            states.append(hidden)
            hidden = block(hidden, cos, sin)
        states.append(hidden)
        logits = self.lm_head(self.model.norm(hidden))
        # transformers reports the last hidden state after the final norm.
        states[-1] = self.model.norm(hidden)
        return SimpleNamespace(logits=logits, hidden_states=tuple(states) if output_hidden_states else None)
