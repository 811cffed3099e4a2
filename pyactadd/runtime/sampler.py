"""One llama.cpp sampler chain per sequence, built the way llama-cpp-python builds its own.

A batch holds sequences with different temperatures and seeds, so each gets a chain of
its own (llama-cpp-python keeps one per Llama). The chain repeats what
``Llama.create_completion`` uses with its defaults (repetition penalties over the last 64
tokens, then top-k 40, typical 1.0, top-p, min-p 0.05, temperature and a draw seeded with
the request's seed; greedy at temperature 0),
so a batched completion draws the same tokens as ``pyactadd run`` from the same logits.
"""

from __future__ import annotations

from pyactadd.native import llama_cpp_module

TOP_K = 40
TYPICAL_P = 1.0
MIN_P = 0.05
PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size


class SequenceSampler:
    """A native sampler chain for one sequence; :meth:`close` frees it (idempotent)."""

    def __init__(
        self, temperature: float, top_p: float, seed: int | None, *, n_vocab: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0
    ) -> None:
        lc = llama_cpp_module()
        self._lc = lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(
            chain, lc.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, 1.0, frequency_penalty, presence_penalty)
        )
        if temperature == 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            for sampler in (
                lc.llama_sampler_init_top_k(TOP_K),
                lc.llama_sampler_init_typical(TYPICAL_P, 1),
                lc.llama_sampler_init_top_p(top_p, 1),
                lc.llama_sampler_init_min_p(MIN_P, 1),
                lc.llama_sampler_init_temp(temperature),
                lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if seed is None else seed),
            ):
                lc.llama_sampler_chain_add(chain, sampler)
        self._chain = chain

    def sample(self, ctx, index: int) -> int:
        """Draw the next token from the logits of batch row ``index`` of ``ctx``'s last decode."""
        return int(self._lc.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        """Free the native chain."""
        if self._chain is not None:
            self._lc.llama_sampler_free(self._chain)
            self._chain = None
