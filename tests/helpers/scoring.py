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


# llama.cpp's batched arithmetic is not bit-identical to one-sequence decoding (other rows in
# the matrix kernels, other KV cells): on the default model a batched row's logits differ from
# the solo ones by up to ~1.5 (measured over prompts of 4-20 tokens), so a batched greedy token
# may be the solo runner-up where two logits are close. Measured teacher-forced gaps of
# batched tokens under their own steering: 0.0-0.09; under the opposite steering: 6-11.
SOLO_TOLERANCE = 0.75


def solo_rows(llama, ids: Sequence[int], steering_items, tokens: Sequence[int]) -> np.ndarray:
    """Teacher-forcing ``tokens`` after ``ids`` alone under ``steering_items`` (llama-cpp-python's
    own one-token path): the logits row before each token, ``[len(tokens), n_vocab]`` float64."""
    from pyactadd.runtime.steering import Steering

    lc = llama_cpp_module()
    steering = Steering.of(llama)
    if steering_items:
        steering.set(list(steering_items), prompt_length=len(ids))
    else:
        steering.clear()
    try:
        llama.reset()
        llama.eval(list(ids))
        rows = np.empty((len(tokens), llama.n_vocab()))
        for k, token in enumerate(tokens):
            rows[k] = np.ctypeslib.as_array(lc.llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),))
            llama.eval([token])
        return rows
    finally:
        steering.clear()


def solo_gap(llama, ids: Sequence[int], steering_items, tokens: Sequence[int]) -> float:
    """The largest amount by which a token's solo logit (:func:`solo_rows`) falls short of the best one
    (0 when each is the solo argmax)."""
    rows = solo_rows(llama, ids, steering_items, tokens)
    if not len(tokens):
        return 0.0
    return float((rows.max(axis=1) - rows[np.arange(len(tokens)), list(tokens)]).max())


def solo_logprobs(llama, ids: Sequence[int], steering_items, tokens: Sequence[int]) -> np.ndarray:
    """Log-probability of each of ``tokens`` after ``ids`` alone under ``steering_items``."""
    rows = log_softmax(solo_rows(llama, ids, steering_items, tokens))
    return rows[np.arange(len(tokens)), list(tokens)]
