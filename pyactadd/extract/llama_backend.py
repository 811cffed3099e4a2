"""Recording block inputs inside llama.cpp: extraction's ``llama`` backend.

The C++ engine's capture mode (``pyactadd_engine_capture`` in ``cpp/include/pyactadd.h``)
copies the graph nodes ``l_out-<L-1>`` (the residual stream entering block ``L``, see
:mod:`pyactadd.vector.layers`) while ``llama_decode`` runs the file's own quantized
weights, on whatever device llama.cpp puts each layer (``n_gpu_layers``), for any
architecture llama.cpp runs. With ``early_stop`` the graph ends after the deepest layer
asked for, through llama.cpp's abort callback.

:class:`LlamaActivations` answers what :func:`pyactadd.extract.activations.record_block_inputs`
answers for a PyTorch model, so tokenization, padding, the methods' aggregation and the
sink checks stay one implementation for both backends. Each prompt is its own sequence
of one ``llama_decode`` (a unified KV cache keeps the batch's token order, and the
attention mask keeps sequences apart), so a right-padding attention mask needs no
masking: the padded positions are simply not run, and their rows are zero.

No torch here: the backend is meant to start fast and to run models PyTorch cannot hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pyactadd.errors import InputError, PyactaddError
from pyactadd.extract.activations import Batch, BlockInputs, checked_batch, checked_mask
from pyactadd.native import default_threads, engine_module, llama_cpp_module
from pyactadd.vector.layers import to_llama_index
from pyactadd.vector.value import ModelFingerprint

__all__ = ["BACKENDS", "TORCH", "ExtractBackend", "LlamaActivations", "checked_backend", "llama_block_inputs"]

BACKENDS = ("torch", "llama")
"""Extraction backends: PyTorch (float32, the paper's numerics) and llama.cpp (the file's own weights)."""

_MAX_DECODE_TOKENS = 4096  # tokens per llama_decode; longer batches are decoded in chunks
_MAX_SEQUENCES = 64  # sequences per llama_decode (llama.cpp allows 256)
_SMALL_WORK = 4e9  # parameters x tokens of one decode below which one thread is used
_ABORTED = 2  # llama_decode's return code after the abort callback stopped the graph


@dataclass(frozen=True)
class ExtractBackend:
    """Where extraction runs the prompts: ``torch`` (float32 PyTorch) or ``llama`` (llama.cpp, ``n_gpu_layers``)."""

    name: str = "torch"
    n_gpu_layers: int | None = None  # llama only: layers offloaded to a GPU (-1: all; None: llama.cpp's default, 0)
    early_stop: bool = True  # llama only: end each graph after the deepest captured layer

    def metadata(self) -> dict[str, object]:
        """What the steering file's ``extra`` records: the backend, for llama only (torch files stay as they were)."""
        return {"backend": self.name} if self.name != "torch" else {}


TORCH = ExtractBackend()


def checked_backend(backend: object, n_gpu_layers: object = None) -> ExtractBackend:
    """``backend`` (a name of :data:`BACKENDS`) with ``n_gpu_layers`` valid for it.

    Raises:
        InputError: an unknown backend, ``n_gpu_layers`` with the torch backend, or
            ``n_gpu_layers`` that is not an integer >= -1.
    """
    if isinstance(backend, ExtractBackend):
        return backend
    if backend not in BACKENDS:
        raise InputError(f"unknown extraction backend {backend!r}: use {' or '.join(BACKENDS)}")
    if n_gpu_layers is None:
        return ExtractBackend(str(backend))
    if backend != "llama":
        raise InputError("--n-gpu-layers applies to --backend llama only (the PyTorch backend runs on the CPU)")
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
        raise InputError(f"n_gpu_layers must be an integer >= -1 (-1: every layer), got {n_gpu_layers!r}")
    return ExtractBackend("llama", n_gpu_layers)


class LlamaActivations:
    """A GGUF model loaded in llama.cpp with the engine attached in capture mode.

    Args:
        model_path: the GGUF file.
        n_gpu_layers: layers llama.cpp offloads to a GPU (-1: all; ignored by a CPU-only build).
        early_stop: end each graph after the deepest captured layer.
        n_threads: llama.cpp threads (default :func:`pyactadd.native.default_threads`).

    Raises:
        InputError: llama.cpp cannot load the file.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_gpu_layers: int = 0,
        early_stop: bool = True,
        n_threads: int | None = None,
    ) -> None:
        self._lc = llama_cpp_module()
        self._path = Path(model_path)
        self._early_stop = early_stop
        self._threads = n_threads
        self._ctx = None
        self._n_ctx = 0
        params = self._lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        with _quiet():
            self._model = self._lc.llama_model_load_from_file(str(self._path).encode(), params)
        if not self._model:
            raise InputError(f"llama.cpp cannot load {self._path}: check that it is a GGUF model file llama.cpp runs")
        self.n_embd = self._lc.llama_model_n_embd(self._model)
        self.n_layer = self._lc.llama_model_n_layer(self._model)
        self._engine = engine_module().Engine(self.n_embd, self.n_layer, False)

    def close(self) -> None:
        """Free the context, then the model (the engine outlives the context that calls it)."""
        with _quiet():
            if self._ctx:
                self._lc.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                self._lc.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> LlamaActivations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict:
        """The engine's counters (rows captured, graphs stopped early, ...)."""
        return self._engine.stats()

    def block_inputs(
        self,
        batch_ids: Sequence[Sequence[int]],
        layers: Sequence[int],
        *,
        attention_mask: Sequence[Sequence[int]] | None = None,
    ) -> dict[int, np.ndarray]:
        """The input of each block in ``layers`` for every prompt: ``{L: float32 [n_prompts, T, n_embd]}``.

        The contract of :func:`pyactadd.extract.activations.record_block_inputs`: equal-length
        prompts, and with ``attention_mask`` (right padding only) the padded positions are
        left out of the pass (their rows are zero).

        Raises:
            InputError: no prompts, an empty or ragged batch, a bad mask, or a layer
                outside ``1 .. n_layer - 1``.
        """
        rows = checked_batch(batch_ids)
        lengths = _lengths(attention_mask, rows)
        wanted = self.checked_layers(layers)
        found = {layer: np.zeros((len(rows), len(rows[0]), self.n_embd), dtype=np.float32) for layer in wanted}
        for chunk in _chunks(lengths):
            captured = self._decode([rows[i][: lengths[i]] for i in chunk], wanted)
            for layer, per_prompt in captured.items():
                for i, h in zip(chunk, per_prompt):
                    found[layer][i, : lengths[i]] = h
        return found

    def run(
        self,
        batches: Sequence[Sequence[Sequence[int]]],
        layers: Sequence[int],
        *,
        attention_masks: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> list[dict[int, np.ndarray]]:
        """:meth:`block_inputs` of each batch (the shape of the streaming path's many-batch call)."""
        masks = list(attention_masks) if attention_masks is not None else [None] * len(batches)
        if len(masks) != len(batches):
            raise InputError(f"{len(masks)} attention masks for {len(batches)} batches")
        return [self.block_inputs(batch, layers, attention_mask=mask) for batch, mask in zip(batches, masks)]

    def checked_layers(self, layers: Sequence[int]) -> list[int]:
        """``layers`` sorted without repeats.

        Raises:
            InputError: none given, or one outside ``1 .. n_layer - 1``.
        """
        wanted = sorted({int(layer) for layer in layers})
        if not wanted:
            raise InputError("the llama backend needs at least one layer")
        for layer in wanted:
            if not 1 <= layer <= self.n_layer - 1:
                raise InputError(
                    f"layer {layer} is out of range for the llama backend on a model with {self.n_layer} blocks: use 1 to "
                    f"{self.n_layer - 1} (llama.cpp has no node for the raw embedding, layer 0)"
                )
        return wanted

    def _threads_for(self, n_tokens: int) -> int:
        """One thread for a small model on a short batch (waking the other threads costs more than they
        save, and far more on a busy machine); else :func:`~pyactadd.native.default_threads`."""
        small = self._lc.llama_model_n_params(self._model) * n_tokens < _SMALL_WORK
        return 1 if small else default_threads()

    def _context(self, n_tokens: int):
        """A context that decodes ``n_tokens`` in one micro-batch, the engine attached (made again when too small)."""
        if self._ctx and n_tokens <= self._n_ctx:
            return self._ctx
        if self._ctx:
            with _quiet():
                self._lc.llama_free(self._ctx)
            self._ctx = None
        size = max(256, -(-n_tokens // 256) * 256)
        params = self._lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = size
        params.n_seq_max = _MAX_SEQUENCES
        params.kv_unified = True  # one stream: llama.cpp keeps the batch's token order in the micro-batch
        params.n_threads = params.n_threads_batch = self._threads or default_threads()
        params.no_perf = True
        self._engine.attach(ctypes.addressof(params))
        with _quiet():
            self._ctx = self._lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise PyactaddError(f"llama.cpp could not create a context of {size} tokens for {self._path.name}")
        self._n_ctx = size
        return self._ctx

    def _decode(self, prompts: list[list[int]], layers: list[int]) -> dict[int, list[np.ndarray]]:
        """One ``llama_decode`` of ``prompts`` as sequences 0, 1, ...; each layer's rows split back per prompt."""
        lc, engine = self._lc, self._engine
        n_tokens = sum(len(ids) for ids in prompts)
        ctx = self._context(n_tokens)
        threads = self._threads or self._threads_for(n_tokens)
        with _quiet():
            lc.llama_set_n_threads(ctx, threads, threads)
        engine.capture([to_llama_index(layer) for layer in layers], self._early_stop)
        engine.capture_clear()
        batch = lc.llama_batch_init(n_tokens, 0, 1)
        try:
            expected = _fill_batch(batch, prompts)
            with _quiet():
                rc = lc.llama_decode(ctx, batch)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        if rc not in (0, _ABORTED):
            raise PyactaddError(f"llama_decode failed with code {rc} on {self._path.name}")
        captured = {}
        for layer in layers:
            rows, positions = self._read(to_llama_index(layer), n_tokens)
            if positions.tolist() != expected and positions.min() >= 0:
                raise PyactaddError(f"llama.cpp computed the tokens of {self._path.name} in another order than the batch's")
            captured[layer] = np.split(rows, np.cumsum([len(ids) for ids in prompts])[:-1])
        engine.capture([], False)
        return captured

    def _read(self, il: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows captured at ``l_out-<il>``; exactly one per token of the decode."""
        n = self._engine.capture_n_rows(il)
        if n != n_tokens:
            raise PyactaddError(
                f"llama.cpp's graph for {self._path.name} gave {n} rows at l_out-{il} for {n_tokens} tokens: "
                f"this architecture is not supported by --backend llama ({self._engine.last_error() or 'no node of that name'})"
            )
        rows = np.empty((n, self.n_embd), dtype=np.float32)
        positions = np.empty(n, dtype=np.int32)
        self._engine.capture_read(il, rows, positions)
        return rows, positions


def llama_block_inputs(
    model_path: Path, fingerprint: ModelFingerprint, layers: Sequence[int], backend: ExtractBackend
) -> BlockInputs:
    """:data:`~pyactadd.extract.activations.BlockInputs` from llama.cpp: the model loads now, checked
    against ``fingerprint`` and ``layers``, and is freed once the batches have run.

    Raises:
        InputError: llama.cpp cannot load the file, its sizes differ from the metadata's, or
            a layer is out of range.
    """
    model = LlamaActivations(model_path, n_gpu_layers=backend.n_gpu_layers or 0, early_stop=backend.early_stop)
    try:
        if model.n_embd != fingerprint.n_embd or model.n_layer != (fingerprint.n_layer or model.n_layer):
            raise InputError(
                f"llama.cpp loads {model_path.name} with n_embd {model.n_embd} and {model.n_layer} blocks but its "
                f"metadata says {fingerprint.describe()}: this model is not supported for extraction"
            )
        model.checked_layers(layers)
    except BaseException:
        model.close()
        raise

    def run(batches: Sequence[Batch], run_layers: Sequence[int]) -> Iterator[dict[int, np.ndarray]]:
        try:
            for batch in batches:
                yield model.block_inputs(batch.ids, run_layers, attention_mask=batch.mask)
        finally:
            model.close()

    return run


def _fill_batch(batch, prompts: list[list[int]]) -> list[int]:
    """Each prompt as its own sequence from position 0; the last token gives logits (llama.cpp wants one output)."""
    i = 0
    positions = []
    for seq, ids in enumerate(prompts):
        for pos, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, 0
            batch.seq_id[i][0] = seq
            positions.append(pos)
            i += 1
    batch.logits[i - 1] = 1
    batch.n_tokens = i
    return positions


def _lengths(mask: Sequence[Sequence[int]] | None, rows: list[list[int]]) -> list[int]:
    """The real tokens of each prompt: all of them without a mask, else the mask's ones (right padding only)."""
    if mask is None:
        return [len(ids) for ids in rows]
    return [sum(bits) for bits in checked_mask(mask, rows)]


def _chunks(lengths: list[int]) -> Iterator[list[int]]:
    """Prompt indices in groups that fit one ``llama_decode`` (a long prompt alone in its group)."""
    group: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if group and (total + n > _MAX_DECODE_TOKENS or len(group) == _MAX_SEQUENCES):
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp's loading messages and the early stop's abort notice stay off stderr.

    llama-cpp-python maps this llama.cpp's warnings to its logger's ERROR level, so only
    CRITICAL keeps them out; failures are reported by the return codes checked here.
    """
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
