"""Sequence-bound steering on the real default model: the engine's declared batches.

Through llama_cpp's low-level API (llama_batch_init, llama_decode, llama_get_logits_ith) on
a context created with ``kv_unified=True`` and the engine attached: a tensor bound to
sequence 1 steers sequence 1's tokens only, in one llama_decode holding two sequences of
the same prompt, whether llama.cpp computes the batch in one micro-batch or several; a
decode of another batch than the declared one is stopped (llama_decode returns 2) with
``batch_status() == -3``; bound tensors without a declaration are not applied.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import llama_cpp as lc

from pyactadd.native import engine_module

PROMPT = "I hate you because my cat keeps stealing the warm spot"
IL = 5  # l_out-5: the residual stream entering block 6 (L = 6)
BATCH_MISMATCH = -3
# Batched vs solo logits are not bit-identical in llama.cpp, steered or not (measured with
# no tensor at all): the second sequence's KV cells sit after the first's, so attention
# sums run in other SIMD lanes, and the Q8 quantization of activations before each Q4_1
# matmul turns a last-bit difference into a visible one. Measured max |logit difference|
# (CPU, one thread, prompts of 4 to 20 tokens): 0.0 for the first sequence always; for
# the second 0.0 or 0.5 to 1.45 (1.06 for PROMPT), against 14 to 28 between steered and
# unsteered logits.
TOLERANCE = 2.0
EXACT = 1e-5  # the same batch with other steering: identical shapes, identical numerics


@pytest.fixture(scope="module")
def model(default_model_path):
    m = lc.llama_model_load_from_file(str(default_model_path).encode(), lc.llama_model_default_params())
    assert m
    yield m
    lc.llama_model_free(m)


@pytest.fixture(scope="module")
def prompt(default_model_path) -> list[int]:
    from pyactadd.prompts.tokens import Tokenizer

    return Tokenizer.from_model(default_model_path).encode(PROMPT)


class Decoder:
    """A kv_unified context with an engine attached; decodes (token, pos, seq) lists."""

    def __init__(self, model, engine, n_ubatch: int = 512) -> None:
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 256, 512, n_ubatch, 4
        params.n_threads = params.n_threads_batch = 1
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.kv_unified = True
        engine.attach(ctypes.addressof(params))
        self.ctx = lc.llama_init_from_model(model, params)
        assert self.ctx
        self.engine = engine

    def close(self) -> None:
        lc.llama_free(self.ctx)  # before the engine it calls into goes away

    def decode(self, tokens, *, declare=None) -> tuple[int, dict[int, np.ndarray]]:
        """llama_decode of ``tokens`` [(token, pos, seq)]; the last logits of each sequence.

        ``declare``: the batch declared first ([(token, pos, seq)]), the same as ``tokens``
        when True, none when None.
        """
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        if declare is not None:
            declared = make_batch(tokens if declare is True else declare)
            try:
                self.engine.declare_batch(ctypes.addressof(declared))
            finally:
                lc.llama_batch_free(declared)
        batch = make_batch(tokens)
        try:
            rc = lc.llama_decode(self.ctx, batch)
            last = {seq: i for i, (_, _, seq) in enumerate(tokens)}
            if rc != 0:
                return rc, {}
            return rc, {
                seq: np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).astype(np.float64)
                for seq, i in last.items()
            }
        finally:
            lc.llama_batch_free(batch)


def make_batch(tokens):
    """A llama_batch of [(token, pos, seq)], logits for the last token of each sequence."""
    batch = lc.llama_batch_init(len(tokens), 0, 1)
    last = {seq: i for i, (_, _, seq) in enumerate(tokens)}
    for i, (token, pos, seq) in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = i in last.values()
    batch.n_tokens = len(tokens)
    return batch


def sequence(prompt, seq: int, first_pos: int = 0):
    return [(token, first_pos + p, seq) for p, token in enumerate(prompt)]


def bound_engine(model, prompt, all_positions: bool):
    """An engine with one random tensor at l_out-5 (a row per prompt token, or one row at every position), bound to seq 1."""
    n_embd, n_layer = lc.llama_model_n_embd(model), lc.llama_model_n_layer(model)
    rows = (np.random.default_rng(0).standard_normal((1 if all_positions else len(prompt), n_embd)) * 8).astype(np.float32)
    engine = engine_module().Engine(n_embd, n_layer, False)
    tensor = engine.add(IL, rows, 0, all_positions)
    engine.set_sequences(tensor, [1])
    return engine


@pytest.mark.parametrize(
    "all_positions,n_ubatch", [(False, 512), (False, 5), (True, 512)], ids=["positions", "positions-ubatch5", "all"]
)
def test_bound_tensor_steers_only_its_sequence(model, prompt, all_positions, n_ubatch):
    engine = bound_engine(model, prompt, all_positions)
    both = sequence(prompt, 0) + sequence(prompt, 1)  # n_ubatch 5: micro-batches across the sequences' border
    decoder = Decoder(model, engine, n_ubatch)
    try:
        engine.reset_stats()
        rc, together = decoder.decode(both, declare=True)
        assert rc == 0 and engine.batch_status() == 0, engine.last_error()
        stats = engine.stats()
        assert stats["n_rows_added"] == len(prompt)  # seq 1's tokens only
        assert stats["n_batch_mismatches"] == 0 and stats["n_errors"] == 0
        engine.set_sequences(0, [])  # unbound: every token by position, both sequences
        _, unbound = decoder.decode(both, declare=True)
        engine.set_sequences(0, [2])  # bound to a sequence not in the batch: nobody
        _, nobody = decoder.decode(both, declare=True)
        engine.set_sequences(0, [1])
        _, unsteered = decoder.decode(sequence(prompt, 0), declare=True)
        _, steered = decoder.decode(sequence(prompt, 1), declare=True)
        assert engine.batch_status() == 0
    finally:
        decoder.close()
    # Same batch, same shapes: each sequence is exactly what it is with the tensor on
    # every token (seq 1) or on none (seq 0).
    assert np.abs(together[1] - unbound[1]).max() <= EXACT
    assert np.abs(together[0] - nobody[0]).max() <= EXACT
    assert np.abs(unbound[0] - nobody[0]).max() > 5 * TOLERANCE  # unbound, seq 0 was steered too
    # Against decoding each sequence alone (llama.cpp's batched numerics, see TOLERANCE).
    assert np.abs(steered[1] - unsteered[0]).max() > 5 * TOLERANCE
    assert np.abs(together[0] - unsteered[0]).max() <= TOLERANCE
    assert np.abs(together[1] - steered[1]).max() <= TOLERANCE


@pytest.mark.parametrize("what", ["positions", "tokens"])
def test_other_batch_than_declared_is_stopped(model, prompt, what):
    engine = bound_engine(model, prompt, False)
    decoder = Decoder(model, engine)
    try:
        actual = sequence(prompt, 1)
        if what == "positions":
            declared = sequence(prompt, 1, first_pos=3)
        else:  # same positions and sequences, another text
            declared = [((token + 1) % decoder.n_vocab, pos, seq) for token, pos, seq in actual]
        engine.reset_stats()
        rc, _ = decoder.decode(actual, declare=declared)
        assert rc == 2  # llama.cpp's "aborted": no logits with wrong steering
        assert engine.batch_status() == BATCH_MISMATCH
        assert ("has position 0, the declared batch has 3" if what == "positions" else "token id") in engine.last_error()
        stats = engine.stats()
        assert stats["n_batch_mismatches"] == 1 and stats["n_rows_added"] == 0
        # Declaring the batch actually decoded works again.
        rc, _ = decoder.decode(actual, declare=True)
        assert rc == 0 and engine.batch_status() == 0
        assert engine.stats()["n_rows_added"] == len(prompt)
    finally:
        decoder.close()


def test_bound_tensor_without_declaration_is_not_applied(model, prompt):
    engine = bound_engine(model, prompt, False)
    decoder = Decoder(model, engine)
    try:
        _, reference = decoder.decode(sequence(prompt, 0), declare=True)  # seq 0: unsteered
        engine.reset_stats()
        rc, undeclared = decoder.decode(sequence(prompt, 1))
        assert rc == 0 and engine.batch_status() == BATCH_MISMATCH
        assert "no batch declared" in engine.last_error()
        assert engine.stats()["n_rows_added"] == 0
    finally:
        decoder.close()
    assert np.abs(undeclared[1] - reference[0]).max() <= EXACT  # alone in the cache either way: same numerics


def test_declare_needs_a_unified_cache(model, prompt):
    engine = bound_engine(model, prompt, False)
    params = lc.llama_context_default_params()
    params.kv_unified = False
    engine.attach(ctypes.addressof(params))
    batch = make_batch(sequence(prompt, 1))
    try:
        with pytest.raises(ValueError, match="kv_unified"):
            engine.declare_batch(ctypes.addressof(batch))
    finally:
        lc.llama_batch_free(batch)
    with pytest.raises(ValueError, match="no steering tensor"):
        engine.set_sequences(99, [0])
