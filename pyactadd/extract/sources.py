"""Where extraction's block inputs come from: the whole model in PyTorch, or the GGUF streamed block by block.

The rule (:func:`torch_path`), overridable with ``$PYACTADD_TORCH_PATH``:

* ``whole``: a Hugging Face model directory, and a GGUF that is a plain llama file
  (:func:`pyactadd.extract.gguf_weights.read_plan` accepts it) whose float32 copy is at
  most :data:`WHOLE_MODEL_MAX_BYTES`: the model is converted once, cached on disk in
  float32 (:mod:`pyactadd.extract.torch_model`) and reloaded from there with torch alone,
  which is the fastest warm start (no transformers import). The default model takes it.
* ``stream``: every other GGUF (:mod:`pyactadd.extract.streaming`): one block in memory at
  a time, only the blocks below the deepest requested layer read, no copy of the model
  in memory or on disk.

Either way the job's peak memory is estimated from the header first
(:mod:`pyactadd.extract.memory`) and a job that does not fit is refused in one line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.activations import Batch, BlockInputs, whole_model_inputs
from pyactadd.extract.memory import Job, check_fits, streaming_estimate, whole_model_estimate
from pyactadd.extract.torch_model import load_torch_model, model_n_embd, model_n_layer
from pyactadd.vector.layers import check_layer
from pyactadd.vector.value import ModelFingerprint

if TYPE_CHECKING:
    from pyactadd.extract.gguf_weights import ConversionPlan

logger = logging.getLogger(__name__)

PATH_ENV = "PYACTADD_TORCH_PATH"
"""``auto`` (the rule above), ``whole`` or ``stream``."""

PATHS = ("auto", "whole", "stream")

WHOLE_MODEL_MAX_BYTES = 1 << 30
"""Largest float32 copy (and disk cache) a GGUF gets on the whole-model path under ``auto``."""

_MORE_MEMORY = "use --backend llama (extracts inside llama.cpp on the file's own weights) or a machine with more memory"


def torch_path(model_path: Path) -> tuple[str, ConversionPlan | None]:
    """``("whole" | "stream", plan)``: the path ``model_path`` takes, and its llama conversion plan when it has one.

    Raises:
        InputError: ``$PYACTADD_TORCH_PATH`` is not one of :data:`PATHS`.
    """
    chosen = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if chosen not in PATHS:
        raise InputError(f"${PATH_ENV} is {chosen!r}: use one of {', '.join(PATHS)}")
    if model_path.is_dir():
        return "whole", None
    if chosen == "stream":
        return "stream", None
    from pyactadd.extract import gguf_weights

    try:
        plan = gguf_weights.read_plan(model_path)
    except gguf_weights.Unsupported as exc:
        logger.debug("%s is not a plain llama file (%s)", model_path.name, exc)
        return chosen if chosen == "whole" else "stream", None
    if chosen == "whole" or 4 * plan.n_parameters <= WHOLE_MODEL_MAX_BYTES:
        return "whole", plan
    return "stream", None


def open_block_inputs(
    model_path: Path, fingerprint: ModelFingerprint, layers: Sequence[int], batches: Sequence[Batch], *, progress: bool
) -> BlockInputs:
    """The block inputs of ``model_path`` for ``batches``, by :func:`torch_path`, after the memory check.

    Nothing is dequantized or loaded before the model is checked against ``fingerprint``
    and ``layers`` and the job's memory estimate against the free memory.

    Raises:
        InputError: a layer the model lacks, sizes other than the metadata's, or a model
            the PyTorch path cannot read (:class:`~pyactadd.extract.gguf_tensors.UnsupportedModel`).
        NotEnoughMemory: the job does not fit (:mod:`pyactadd.extract.memory`).
    """
    path, plan = torch_path(model_path)
    if path == "stream":
        return _streaming_inputs(model_path, fingerprint, layers, batches, progress=progress)
    if plan is not None:
        config = plan.config
        job = _job(batches, layers, fingerprint.n_embd, config["intermediate_size"], config["num_attention_heads"])
        check_fits(whole_model_estimate(plan.tensors, job), f"loading {model_path.name} whole in float32", _MORE_MEMORY)
    return whole_model_inputs(load_whole_model(model_path, fingerprint, layers, progress=progress))


def load_whole_model(model_path: Path, fingerprint: ModelFingerprint, layers: Sequence[int], *, progress: bool):
    """The whole PyTorch model (:func:`~pyactadd.extract.torch_model.load_torch_model`), checked against the metadata.

    Raises:
        InputError: a layer the loaded model lacks, or sizes other than the metadata's.
    """
    model = load_torch_model(model_path, progress=progress)
    n_layer, n_embd = model_n_layer(model), model_n_embd(model)
    _check_sizes(model_path, fingerprint, layers, n_layer, n_embd)
    return model


def _check_sizes(model_path: Path, fingerprint: ModelFingerprint, layers: Sequence[int], n_layer: int, n_embd: int) -> None:
    for layer in layers:
        check_layer(layer, n_layer)
    if n_embd != fingerprint.n_embd or n_layer != (fingerprint.n_layer or n_layer):
        raise InputError(
            f"the PyTorch model of {model_path.name} has n_embd {n_embd} and {n_layer} blocks "
            f"but its metadata says {fingerprint.describe()}: this model is not supported for extraction"
        )


def _job(batches: Sequence[Batch], layers: Sequence[int], n_embd: int, n_ff: int, n_head: int) -> Job:
    return Job([(len(batch.ids), len(batch.ids[0])) for batch in batches], sorted(layers), n_embd, n_ff, n_head)


def _streaming_inputs(
    model_path: Path, fingerprint: ModelFingerprint, layers: Sequence[int], batches: Sequence[Batch], *, progress: bool
) -> BlockInputs:
    from pyactadd.extract.gguf_tensors import check_dequantizable
    from pyactadd.extract.streaming import StreamingModel

    model = StreamingModel(model_path)
    try:
        _check_sizes(model_path, fingerprint, layers, model.n_layer, model.n_embd)
        check_dequantizable(model_path.name, model.file.needed_tensors(max(layers)))
        config = model.config
        job = _job(batches, layers, model.n_embd, config.intermediate_size, config.num_attention_heads)
        distinct = len(np.unique(np.concatenate([np.ravel(batch.ids) for batch in batches])))
        estimate = streaming_estimate(list(model.file.tensors.values()), job, distinct)
        check_fits(estimate, f"streaming {model_path.name} to layer {max(layers)}", _MORE_MEMORY)
    except BaseException:
        model.close()
        raise
    if progress:
        print(
            f"Reading {model_path.name} block by block (blocks 0-{max(layers) - 1} of {model.n_layer}; no float32 copy)",
            file=sys.stderr,
            flush=True,
        )

    def run(run_batches: Sequence[Batch], run_layers: Sequence[int]) -> Iterator[dict[int, np.ndarray]]:
        try:
            yield from model.run(run_batches, run_layers)
        finally:
            model.close()

    return run
