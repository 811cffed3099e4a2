"""Steering behaviour and cache hygiene on the real default model in llama.cpp."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pyactadd.default_model import default_model_path
from pyactadd.extract.pipeline import extract
from pyactadd.runtime.generate import Sampling, complete, load_llama, prompt_tokens, run
from helpers.scoring import next_token_logprobs
from pyactadd.runtime.steering import Steering
from pyactadd.vector.value import SteeringVector

# Word sets fixed in advance, before looking at how much each one moves.
POSITIVE_WORDS = [" love", " beautiful", " wonderful", " amazing", " kind"]
NEGATIVE_WORDS = [" stupid", " ugly", " bad", " evil", " angry"]


@pytest.fixture(scope="module")
def llama():
    return load_llama(default_model_path(), n_ctx=512, n_threads=2)


@pytest.fixture(scope="module")
def love_hate():
    return extract("Love", "Hate", [6], coeff=1.0)


def last_logprobs(llama, ids) -> np.ndarray:
    """Log-probabilities of the next token after ``ids`` under the steering in force."""
    return next_token_logprobs(llama, ids)


def first_token(llama, word: str) -> int:
    ids = llama.tokenize(word.encode(), add_bos=False, special=False)
    return ids[0]


def test_love_minus_hate_shifts_next_token_probabilities(llama, love_hate):
    steering = Steering.of(llama)
    ids = prompt_tokens(llama, "I hate you because")
    pos = [first_token(llama, w) for w in POSITIVE_WORDS]
    neg = [first_token(llama, w) for w in NEGATIVE_WORDS]

    steering.clear()
    base = last_logprobs(llama, ids)
    steering.set([(love_hate, 2.0)])
    steered = last_logprobs(llama, ids)
    steering.clear()

    gain_pos = steered[pos] - base[pos]
    gain_neg = steered[neg] - base[neg]
    # Each positive word gains and each negative word loses, in log-probability.
    assert (gain_pos > 0).all(), gain_pos
    assert (gain_neg < 0).all(), gain_neg
    assert gain_pos.mean() - gain_neg.mean() > 1.0


def test_extraction_is_deterministic(love_hate):
    again = extract("Love", "Hate", [6], coeff=1.0)
    for layer in love_hate.layer_ids:
        assert np.array_equal(love_hate.layers[layer], again.layers[layer])


def test_changing_steering_invalidates_the_kv_prefix(llama, love_hate):
    """Steered, then unsteered with the same prompt and seed, equals a fresh unsteered run."""
    sampling = Sampling(max_tokens=16, temperature=0.8, seed=7)
    prompt = "I think that you are"
    fresh = load_llama(default_model_path(), n_ctx=512, n_threads=2)
    expected = complete(fresh, prompt_tokens(fresh, prompt), sampling)

    ids = prompt_tokens(llama, prompt)
    steering = Steering.of(llama)
    steering.set([(love_hate, 8.0)])
    steered = complete(llama, ids, sampling)
    steering.clear()
    unsteered = complete(llama, ids, sampling)

    assert steered != expected, "the steering must change the text for this test to mean anything"
    assert unsteered == expected


def test_run_compare_uses_same_seed(llama, love_hate):
    sampling = Sampling(max_tokens=12, temperature=0.8, seed=3)
    first = run(llama, "I hate you because", [(love_hate, 5.0)], sampling, compare=True)
    second = run(llama, "I hate you because", [(love_hate, 5.0)], sampling, compare=True)
    assert first == second
    assert first["unsteered"] != first["steered"]


def _shifted(vector: SteeringVector, n_rows: int, length: int) -> np.ndarray:
    """The vector's layer-6 rows placed from position ``n_rows`` in a front-aligned block of ``length`` rows."""
    rows = np.zeros((length, vector.n_embd), dtype=np.float32)
    own = vector.layers[6]
    rows[n_rows:n_rows + len(own)] = own
    return rows


def test_each_item_is_placed_by_its_own_alignment(llama, love_hate):
    """(vector, coeff, align) items mix alignments in one set(); the result matches one
    front-aligned vector holding both placements (an independent construction)."""
    steering = Steering.of(llama)
    ids = prompt_tokens(llama, "I hate you so much because")
    n, rows = len(ids), love_hate.n_positions
    back = dataclasses.replace(love_hate, alignment="back", extra=dict(love_hate.extra))

    steering.set([(love_hate, 3.0, "front"), (back, 2.0)], prompt_length=n)
    assert [(a.align, a.offset) for a in steering.applied] == [("front", 0), ("back", n - rows)]
    mixed = last_logprobs(llama, ids)

    both = _shifted(love_hate, 0, n) * 3.0 + _shifted(love_hate, n - rows, n) * 2.0
    reference = SteeringVector(layers={6: both}, fingerprint=love_hate.fingerprint, alignment="front")
    steering.set([(reference, 1.0)], prompt_length=n)
    expected = last_logprobs(llama, ids)
    steering.clear()
    assert not np.allclose(expected, last_logprobs(llama, ids), atol=1e-2), "the steering must matter"
    np.testing.assert_allclose(mixed, expected, atol=1e-3)


def test_align_overrides_every_item(llama, love_hate):
    steering = Steering.of(llama)
    steering.set([(love_hate, 1.0, "back"), (love_hate, 1.0, 2)], align=1, prompt_length=6)
    assert [(a.align, a.offset) for a in steering.applied] == [(1, 1), (1, 1)]
    steering.set([(love_hate, 1.0, 3), (love_hate, 1.0)], prompt_length=6)
    assert [(a.align, a.offset) for a in steering.applied] == [(3, 3), ("front", 0)]
    steering.clear()


def test_all_and_per_position_items_mix_in_the_runtime(llama, love_hate):
    steering = Steering.of(llama)
    row = SteeringVector(layers={6: love_hate.layers[6][-1:].copy()}, fingerprint=love_hate.fingerprint, alignment="all")
    with steering.steer([(row, 2.0), (love_hate, 2.0, "front")]):
        assert [(a.align, a.offset) for a in steering.applied] == [("all", None), ("front", 0)]
    assert steering.applied == ()
