"""Steering behaviour and cache hygiene on the real default model in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from pyactadd.default_model import default_model_path
from pyactadd.extract.pipeline import extract
from pyactadd.runtime.generate import Sampling, complete, load_llama, prompt_tokens, run
from helpers.scoring import next_token_logprobs
from pyactadd.runtime.steering import Steering

# Word sets fixed in advance; at block 6, c = 2 every positive word gained 0.6 to 2.6 nats
# and every negative word lost 0.9 to 1.6 when measured on this model.
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
