"""Many-pair extraction: prompt pairs -> one steering vector (the PyTorch stage).

The pairs come from :func:`pyactadd.prompts.pairs.load_pairs` (a JSONL file) or from
code, and take the same path as a single pair (:mod:`pyactadd.extract.pipeline`).
Prompts go through the model in batches (``batch_size`` pairs, both prompts of a pair in
the same batch) with a progress bar. Three methods (the maths is in :mod:`pyactadd.extract.methods`):

* ``actadd``: every prompt is right-padded with the pad token to the longest prompt of the
  whole set (pads are real tokens, as in single-pair ActAdd; no mask); the per-position
  differences are averaged over pairs. One pair gives exactly :func:`pyactadd.extract`'s
  rows. Alignment ``front``.
* ``mean``: prompts are right-padded within a batch and masked out with an attention
  mask; each prompt is read at its last real token (whose causal context is never the
  padding), and the differences are averaged. One row per layer, alignment ``all``.
* ``pca``: the same last-token activations; the first principal component of the
  differences, signed and scaled as :func:`pyactadd.extract.methods.pca_direction` says.
  Alignment ``all``.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.extract.llama_backend import checked_backend
from pyactadd.extract.methods import LAST_TOKENS, METHODS, POSITIONS, Method
from pyactadd.extract.options import checked_batch_size, checked_coeff, checked_rows
from pyactadd.extract.pipeline import (
    DEFAULT_BATCH_SIZE,
    Prepared,
    prepare,
    progress_bar,
    record,
    run_method,
    steering_vector,
)
from pyactadd.prompts.pairs import Pair, checked_pair
from pyactadd.vector.value import SteeringVector

__all__ = ["DEFAULT_BATCH_SIZE", "extract_pairs", "last_token_activations"]

PairLike = Pair | tuple[str, str] | dict


def extract_pairs(
    pairs: Iterable[PairLike],
    layers: int | Sequence[int],
    *,
    method: str = "actadd",
    coeff: float = 1.0,
    model: str | os.PathLike[str] | None = None,
    pad: str = " ",
    anchor: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    pca_center: bool = False,
    zero_rows: Sequence[int] = (),
    zero_outliers: bool = False,
    progress: bool = False,
    backend: str = "torch",
    n_gpu_layers: int | None = None,
) -> SteeringVector:
    """Extract one steering vector from many prompt pairs (see the module docstring for the methods).

    Args:
        pairs: :class:`Pair` objects, ``(positive, negative)`` tuples or dicts.
        layers: block-input layer(s) ``L``, all recorded in the same forward passes.
        method: ``"actadd"``, ``"mean"`` or ``"pca"``.
        coeff: finite number multiplied into the rows.
        model: GGUF file or Hugging Face directory; ``None`` for the default model.
        pad: single-token text that pads prompts (``actadd``: a real token; ``mean``/``pca``: masked).
        anchor: ``"none"``, ``"bos"`` or a single token put first in every prompt.
        batch_size: pairs per forward pass.
        pca_center: ``pca`` only: subtract the mean difference first (repeng's ``pca_diff``).
        zero_rows, zero_outliers: ``actadd`` only, as in :func:`pyactadd.extract`.
        progress: show a progress bar on stderr.
        backend, n_gpu_layers: where the prompts run, as in :func:`pyactadd.extract`.

    Warns:
        SinkRowWarning: a row (``actadd``) or a last token (``mean``/``pca``) sits on an
            attention-sink position whose residual is far above the typical norm.

    Raises:
        InputError: no pairs, an empty prompt, an unknown method, a layer out of range,
            an option the method does not take, or a missing model.
    """
    chosen = _method(method)
    coeff = checked_coeff(coeff)
    batch_size = checked_batch_size(batch_size)
    where = checked_backend(backend, n_gpu_layers)
    _check_method_options(chosen, zero_rows, zero_outliers, pca_center)
    prepared = _prepare(pairs, layers, model, pad, anchor)
    if pca_center and len(prepared.pairs) < 2:
        raise InputError("centered PCA needs at least two pairs: add pairs or drop --pca-center")
    rows = checked_rows(zero_rows, prepared.n_positions) if chosen.reads == POSITIONS else []
    steered = run_method(
        prepared, chosen, coeff=coeff, center=pca_center, zero_rows=rows, zero_outliers=zero_outliers,
        batch_size=batch_size, progress=progress, bar=progress, backend=where,
    )
    return steering_vector(prepared, chosen, steered, coeff)


def last_token_activations(
    pairs: Iterable[PairLike],
    layers: int | Sequence[int],
    *,
    model: str | os.PathLike[str] | None = None,
    pad: str = " ",
    anchor: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The residual stream entering each block in ``layers`` at every prompt's last token.

    Exactly what methods ``mean`` and ``pca`` work from (batched, right-padded, masked).

    Returns:
        ``{L: (positive, negative)}``, float32 arrays ``[n_pairs, n_embd]`` in pair order.

    Raises:
        InputError: as :func:`extract_pairs`.
    """
    batch_size = checked_batch_size(batch_size)
    prepared = _prepare(pairs, layers, model, pad, anchor)
    with progress_bar(len(prepared.ids), "last tokens", progress) as update:
        last, _ = record(prepared, LAST_TOKENS, batch_size=batch_size, on_batch=update, progress=progress)
    return {layer: (rows[0::2].copy(), rows[1::2].copy()) for layer, rows in last.items()}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}: use {', '.join(METHODS)}")
    return METHODS[name]


def _check_method_options(method: Method, zero_rows: Sequence[int], zero_outliers: bool, pca_center: bool) -> None:
    """Refuse the options ``method`` does not take."""
    if method.reads != POSITIONS and (tuple(zero_rows) or zero_outliers):
        raise InputError(f"--zero-row and --zero-outliers apply to per-position rows (method actadd), not to {method.name}")
    if pca_center and method.name != "pca":
        raise InputError("--pca-center applies to method pca only")


def _prepare(pairs: Iterable[PairLike], layers, model, pad: str, anchor: str) -> Prepared:
    """Check the pairs, then the rest (no torch yet)."""
    checked = [checked_pair(item, f"pair {index}") for index, item in enumerate(pairs)]
    if not checked:
        raise InputError("no pairs given: pass at least one (positive, negative) pair")
    return prepare(checked, layers, model, pad, anchor)
