"""Scores computed from llama.cpp's logits under the steering in force."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pyactadd.native import llama_cpp_module


def next_token_logits(llama, ids: Sequence[int]) -> np.ndarray:
    """The logits llama.cpp gives the token after ``ids`` (evaluated from scratch)."""
    lc = llama_cpp_module()
    llama.reset()
    llama.eval(list(ids))
    n_vocab = llama.n_vocab()
    pointer = lc.llama_get_logits_ith(llama.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_logprobs(llama, ids: Sequence[int]) -> np.ndarray:
    """Log-probabilities of every vocabulary token following ``ids``."""
    return log_softmax(next_token_logits(llama, ids))
