"""Log-probabilities from llama.cpp's logits rows, for scoring and for generated tokens."""

from __future__ import annotations

import numpy as np

_LSE_ROWS = 32
"""Rows of logits per log-sum-exp block: small enough for a block to stay in the CPU cache (docs/performance.md)."""


def logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    """``log(sum(exp(row)))`` of every row of a float32 ``[n, n_vocab]`` array, as float64."""
    n = logits.shape[0]
    out = np.empty(n, dtype=np.float64)
    buffer = np.empty((min(n, _LSE_ROWS), logits.shape[1]), dtype=np.float32)
    for start in range(0, n, _LSE_ROWS):
        block = logits[start : start + _LSE_ROWS]
        k = block.shape[0]
        peak = block.max(axis=1)
        work = buffer[:k]
        np.subtract(block, peak[:, None], out=work)
        np.exp(work, out=work)
        out[start : start + k] = np.log(work.sum(axis=1, dtype=np.float64)) + peak
    return out


def token_logprob(row: np.ndarray, token: int) -> float:
    """Log-probability of ``token`` under one float32 logits row (the model's own distribution)."""
    return float(row[token]) - float(logsumexp_rows(row[None, :])[0])
