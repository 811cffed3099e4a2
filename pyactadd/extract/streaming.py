"""Streaming PyTorch extraction: block inputs of a GGUF model, one transformer block in memory at a time.

:meth:`StreamingModel.run` embeds every prompt of the job (only the embedding rows of
their tokens are dequantized), then for block ``i = 0 .. max(layers) - 1`` builds that ONE
transformers decoder layer on the meta device, assigns it its tensors dequantized from the
file (:class:`~pyactadd.extract.gguf_tensors.GGUFTensors`), runs every batch through it,
records the input of each requested layer and frees the block. Block ``max(layers)`` and
those after it are never read. Peak memory is therefore one float32 block plus the
activations, whatever the model's size (:mod:`pyactadd.extract.memory` estimates it).

The numerics are transformers' own: its decoder-layer classes, rotary-embedding modules,
scaled embeddings (gemma) and mask functions, called as each architecture's
``*Model.forward`` calls them (mask per layer type, sliding windows, one rotary table per
layer type for gemma3), with the attention implementation ``from_pretrained`` picks (sdpa,
or eager where the class lacks sdpa: gemma2's softcapping). "Input of block L" is exactly
transformers' ``hidden_states[L]``, pyactadd's layer L.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.activations import Batch, checked_batch, checked_mask
from pyactadd.extract.gguf_tensors import EMBEDDING, GGUFTensors, UnsupportedModel, unsupported_architecture_message

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Architecture:
    """Where transformers keeps one architecture's pieces, and how its model forward picks masks."""

    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix: <prefix>DecoderLayer, <prefix>RotaryEmbedding, <prefix>PreTrainedModel
    masks: str  # "full": causal everywhere; "config_window": sliding iff config.sliding_window; "layer_types"
    scaled_embedding: str | None = None  # gemma: embeddings times sqrt(hidden_size)
    rotary_per_layer_type: bool = False  # gemma3: rotary_emb(x, positions, layer_type)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "Llama", "full"),
    "mistral": Architecture("mistral", "Mistral", "config_window"),
    "qwen2": Architecture("qwen2", "Qwen2", "layer_types"),
    "qwen3": Architecture("qwen3", "Qwen3", "layer_types"),
    "gemma2": Architecture("gemma2", "Gemma2", "layer_types", scaled_embedding="Gemma2TextScaledWordEmbedding"),
    "gemma3_text": Architecture(
        "gemma3", "Gemma3", "layer_types", scaled_embedding="Gemma3TextScaledWordEmbedding", rotary_per_layer_type=True
    ),
    "phi3": Architecture("phi3", "Phi3", "config_window"),
}
"""transformers model_type (as transformers derives it from the GGUF file) -> its pieces."""

# Tensors llama.cpp stores that transformers' layers compute themselves (llama3's rope_freqs).
_COMPUTED_TENSORS = ("rope_freqs.weight",)


@dataclass
class _BatchState:
    """One batch on its way through the blocks: the residual stream and what every block takes with it."""

    hidden: Any  # torch.Tensor [batch, seq, n_embd]
    masks: dict[str, Any]  # mask kind -> what the layer's attention_mask is
    rope: Any  # (cos, sin), or {layer type: (cos, sin)} for gemma3
    position_ids: Any


class StreamingModel:
    """A GGUF file ready for streaming extraction: its transformers config, classes and name map.

    Cheap to build (the header, the config, one meta-device layer per block for the names);
    no tensor is read until :meth:`run`. Use as a context manager or call :meth:`close`.

    Raises:
        UnsupportedModel: see :class:`GGUFTensors`; also a tensor missing or of another
            shape than transformers' layer expects, or a config this path does not run.
    """

    def __init__(self, gguf_path: str | os.PathLike[str]) -> None:
        self.file = GGUFTensors(gguf_path)
        try:
            self._setup()
        except BaseException:
            self.file.close()
            raise

    @property
    def name(self) -> str:
        return self.file.path.name

    @property
    def n_layer(self) -> int:
        """Number of transformer blocks."""
        return self.file.n_layer

    @property
    def n_embd(self) -> int:
        """Width of the residual stream."""
        return self.file.n_embd

    def _setup(self) -> None:
        import torch  # noqa: F401  (transformers' modeling modules need it)
        from transformers import CONFIG_MAPPING

        model_type = self.file.model_type
        self.arch = ARCHITECTURES.get(model_type)
        if self.arch is None:  # a supported GGUF architecture that transformers maps to another model_type
            raise UnsupportedModel(unsupported_architecture_message(self.name, model_type))
        self._modeling = importlib.import_module(f"transformers.models.{self.arch.module}.modeling_{self.arch.module}")
        self.layer_class = getattr(self._modeling, f"{self.arch.prefix}DecoderLayer")
        config = CONFIG_MAPPING[model_type].from_dict(dict(self.file.config))
        # What from_pretrained picks on the CPU: sdpa where the model class supports it, else eager.
        pretrained = getattr(self._modeling, f"{self.arch.prefix}PreTrainedModel")
        config._attn_implementation = "sdpa" if getattr(pretrained, "_supports_sdpa", False) else "eager"
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModel(f"{self.name}: bidirectional attention (an embedding model): use --backend llama")
        self.config = config
        self._rotary_module = None
        self._map_names()

    def _map_names(self) -> None:
        """transformers' name map for every block; each tensor checked against the layer's shape, from the header."""
        keys = ["model.embed_tokens.weight"]
        shapes: dict[str, tuple[int, ...]] = {}
        for block in range(self.n_layer):
            for name, tensor in self._meta_layer(block).state_dict().items():
                keys.append(f"model.layers.{block}.{name}")
                shapes[keys[-1]] = tuple(tensor.shape)
        self.gguf_to_hf = self.file.hf_names(keys)
        self._hf_to_gguf = {hf: gguf for gguf, hf in self.gguf_to_hf.items()}
        if self._hf_to_gguf.get("model.embed_tokens.weight") != EMBEDDING:
            raise UnsupportedModel(f"{self.name}: no {EMBEDDING} for model.embed_tokens: use --backend llama")
        for hf_name, shape in shapes.items():
            info = self.file.tensors.get(self._hf_to_gguf.get(hf_name, ""))
            if info is None:
                raise UnsupportedModel(f"{self.name} has no tensor for {hf_name}: use --backend llama")
            if info.shape != shape:
                raise UnsupportedModel(
                    f"{self.name}: {info.name} is {list(info.shape)} but transformers' {self.layer_class.__name__} "
                    f"built from the file's metadata expects {list(shape)}: use --backend llama"
                )

    def _meta_layer(self, block: int):
        import torch

        with torch.device("meta"):
            return self.layer_class(self.config, block)

    def build_layer(self, block: int):
        """Decoder layer ``block`` with its weights dequantized from the file (built on meta, weights assigned).

        Raises:
            UnsupportedModel: the file has a tensor for the block that the layer has no place for.
        """
        unused = [
            name for name in self.file.block_tensor_names(block)
            if name not in self.gguf_to_hf and not name.endswith(_COMPUTED_TENSORS)
        ]
        if unused:
            raise UnsupportedModel(
                f"{self.name}: tensor {unused[0]} has no place in transformers' {self.layer_class.__name__}: use --backend llama"
            )
        layer = self._meta_layer(block)
        prefix = f"model.layers.{block}."
        state = {name: self.file.tensor(self._hf_to_gguf[prefix + name]) for name in layer.state_dict()}
        layer.load_state_dict(state, strict=True, assign=True)
        for name, buffer in layer.named_buffers():
            if buffer.is_meta:
                raise UnsupportedModel(f"{self.layer_class.__name__} buffer {name} is not in the file")
        return layer.eval()

    def run(self, batches: Sequence[Batch], layers: Sequence[int]) -> list[dict[int, np.ndarray]]:
        """Block inputs of every batch at every layer in ``layers``, in ONE pass over the model's blocks.

        Each batch's prompts have one length (pad them first); batches may differ in
        length. A batch's mask (1 real, 0 pad; right padding only) masks its padding as
        :func:`pyactadd.extract.activations.record_block_inputs` does.

        Returns:
            One dict per batch: ``{L: float32 array [batch, seq, n_embd]}``, new arrays.

        Raises:
            InputError: no batches, an empty prompt, a ragged batch, a layer outside
                ``0 .. n_layer - 1``, a bad mask, a token id outside the vocabulary.
            UnsupportedModel: a block the file cannot fill (one line, naming ``--backend llama``).
        """
        import torch

        wanted = self._checked_layers(layers)
        if not batches:
            raise InputError("streaming extraction needs at least one batch")
        results: list[dict[int, np.ndarray]] = [{} for _ in batches]
        with torch.inference_mode():
            states = self._start(batches, deepest=wanted[-1])
            for block in range(wanted[-1] + 1):
                if block in wanted:
                    for result, state in zip(results, states):
                        result[block] = state.hidden.detach().to(torch.float32).clone().numpy()
                if block < wanted[-1]:
                    self._run_block(block, states)
        return results

    def _checked_layers(self, layers: Sequence[int]) -> list[int]:
        wanted = sorted({int(layer) for layer in layers})
        if not wanted:
            raise InputError("streaming extraction needs at least one layer")
        for layer in wanted:
            if not 0 <= layer < self.n_layer:
                raise InputError(f"layer {layer} is not a block input of this {self.n_layer}-block model")
        return wanted

    def _run_block(self, block: int, states: list[_BatchState]) -> None:
        """Every batch through block ``block``; the block's weights are freed on return."""
        layer = self.build_layer(block)
        kind = self._mask_kind(block)
        for state in states:
            rope = state.rope[self.config.layer_types[block]] if self.arch.rotary_per_layer_type else state.rope
            state.hidden = layer(
                state.hidden,
                attention_mask=state.masks[kind],
                position_embeddings=rope,
                position_ids=state.position_ids,
                cache=None,
            )

    def _start(self, batches: Sequence[Batch], *, deepest: int) -> list[_BatchState]:
        """Every batch embedded, with its masks and rotary tables (the job's embedding rows read once)."""
        import torch

        checked = [(checked_batch(batch.ids), batch.mask) for batch in batches]
        all_ids = torch.tensor(sorted({t for rows, _ in checked for row in rows for t in row}), dtype=torch.long)
        table = self.file.embedding_rows(all_ids.tolist())
        kinds = {self._mask_kind(block) for block in range(deepest)}
        states = []
        for rows, mask_rows in checked:
            ids = torch.tensor(rows, dtype=torch.long)
            # This batch's rows of the job's table (sorted ids, so searchsorted finds them).
            hidden = self._embed(ids, table[torch.searchsorted(all_ids, torch.unique(ids))])
            mask = None if mask_rows is None else torch.tensor(checked_mask(mask_rows, rows), dtype=torch.long)
            states.append(self._state(hidden, mask, kinds))
        return states

    def _state(self, hidden: torch.Tensor, mask: torch.Tensor | None, kinds: set[str]) -> _BatchState:
        import torch
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
        arguments = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=position_ids)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = {kind: makers[kind](**arguments) for kind in kinds}
        rotary = self._rotary()
        if self.arch.rotary_per_layer_type:
            rope = {kind: rotary(hidden, position_ids, kind) for kind in set(self.config.layer_types)}
        else:
            rope = rotary(hidden, position_ids)
        return _BatchState(hidden, masks, rope, position_ids)

    def _embed(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``ids`` as the architecture's embedding module computes them, from ``rows`` of the unique ids."""
        import torch
        from torch import nn

        unique, inverse = torch.unique(ids, return_inverse=True)
        if self.arch.scaled_embedding is None:
            embedding = nn.Embedding(len(unique), self.n_embd, _weight=rows, _freeze=True)
        else:
            scaled = getattr(self._modeling, self.arch.scaled_embedding)
            embedding = scaled(len(unique), self.n_embd, None, embed_scale=self.config.hidden_size**0.5)
            embedding.weight = nn.Parameter(rows, requires_grad=False)
        return embedding(inverse)

    def _mask_kind(self, block: int) -> str:
        if self.arch.masks == "full":
            return "full_attention"
        if self.arch.masks == "config_window":
            return "full_attention" if self.config.sliding_window is None else "sliding_attention"
        return self.config.layer_types[block]

    def _rotary(self):
        if self._rotary_module is None:
            rotary = getattr(self._modeling, f"{self.arch.prefix}RotaryEmbedding")
            self._rotary_module = rotary(config=self.config)
        return self._rotary_module

    def close(self) -> None:
        """Close the file."""
        self.file.close()

    def __enter__(self) -> "StreamingModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def block_inputs(
    gguf_path: str | os.PathLike[str] | StreamingModel,
    batch_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    attention_mask: Sequence[Sequence[int]] | None = None,
) -> dict[int, np.ndarray]:
    """The inputs of the blocks ``layers`` for one batch: ``{L: float32 [batch, seq, n_embd]}``.

    The streaming counterpart of ``record_block_inputs(load_torch_model(path), batch_ids, layers)``;
    ``gguf_path`` may be an open :class:`StreamingModel`. See :meth:`StreamingModel.run`.
    """
    batch = Batch([list(ids) for ids in batch_ids], None if attention_mask is None else [list(m) for m in attention_mask])
    if isinstance(gguf_path, StreamingModel):
        return gguf_path.run([batch], layers)[0]
    with StreamingModel(gguf_path) as model:
        return model.run([batch], layers)[0]
