"""Batched generation: per-sequence steering in one llama_decode equals each request run alone."""

from __future__ import annotations

import numpy as np
import pytest

from pyactadd.default_model import default_model_path
from pyactadd.errors import EngineError, InputError
from pyactadd.extract.pipeline import extract
from pyactadd.runtime.batch import Batcher, Request, first_stop, generate_batch, held_back
from pyactadd.runtime.generate import Sampling, complete, load_llama, prompt_tokens
from pyactadd.runtime.steering import Steering
from pyactadd.vector.value import SteeringVector
from helpers.scoring import SOLO_TOLERANCE, solo_gap, solo_logprobs

GREEDY = Sampling(max_tokens=24, temperature=0.0)
# Measured: a batched token's log-probability against the same token teacher-forced alone,
# up to ~0.2 per token and ~0.03 averaged over a completion (llama.cpp's batch numerics).
LOGPROB_TOLERANCE, MEAN_LOGPROB_TOLERANCE = 0.5, 0.1
PROMPTS = ["I hate you because", "The weather today is", "My favourite food is", "Yesterday I went to"]


@pytest.fixture(scope="module")
def llama():
    return load_llama(default_model_path(), n_ctx=256, n_threads=2)


@pytest.fixture(scope="module")
def love():
    return extract("Love", "Hate", [6], coeff=1.0)


@pytest.fixture(scope="module")
def random_all(love):
    # A one-row vector for 'all' alignment: row 0 of love at every position, as llama.cpp's control vectors add.
    layers = {layer: rows[:1].copy() for layer, rows in love.layers.items()}
    return SteeringVector(layers=layers, alignment="all", fingerprint=love.fingerprint)


def solo(llama, ids, steering_items, sampling=GREEDY, align=None) -> str:
    """The completion of ``ids`` generated alone on the Llama's own context (llama-cpp-python's path)."""
    steering = Steering.of(llama)
    if steering_items:
        steering.set(list(steering_items), align=align, prompt_length=len(ids))
    else:
        steering.clear()
    try:
        return complete(llama, ids, sampling)
    finally:
        steering.clear()


def test_a_sequence_is_untouched_by_its_neighbours_steering(llama, love):
    # Exact: the batch has the same shape, only the other sequence's steering differs.
    ids = prompt_tokens(llama, PROMPTS[0])
    short = Sampling(max_tokens=12, temperature=0.0)
    plain, plus, minus = Request(ids, (), short), Request(ids, [(love, 6.0)], short), Request(ids, [(love, -6.0)], short)
    with_plus = generate_batch(llama, [plain, plus], parallel=2)
    with_minus = generate_batch(llama, [plain, minus], parallel=2)
    beside_plain = generate_batch(llama, [minus, plus], parallel=2)
    assert all(c.finish_reason == "length" for c in with_plus + with_minus + beside_plain)  # same batch shapes throughout
    assert with_plus[0].text == with_minus[0].text
    assert with_plus[1].text == beside_plain[1].text
    assert with_minus[1].text == beside_plain[0].text
    assert len({with_plus[0].text, with_plus[1].text, with_minus[1].text}) == 3


def test_batched_greedy_tokens_are_solo_argmax_within_numerics(llama, love, random_all):
    ids = prompt_tokens(llama, PROMPTS[0])
    settings = [[(love, 6.0)], [], [(love, -6.0)], [(random_all, 8.0)]]
    batched = generate_batch(llama, [Request(ids, s, GREEDY) for s in settings], parallel=4)
    for steering, completion in zip(settings, batched):
        assert solo_gap(llama, ids, steering, completion.tokens) <= SOLO_TOLERANCE, steering
    # The check can fail: under the opposite steering these tokens are far from the argmax.
    assert solo_gap(llama, ids, [(love, -6.0)], batched[0].tokens) > 3 * SOLO_TOLERANCE
    assert solo_gap(llama, ids, [(love, -6.0)], batched[1].tokens) > 3 * SOLO_TOLERANCE
    assert batched[0].text == solo(llama, ids, settings[0])  # where the solo margins are wide, the text is the same


def test_more_requests_than_sequences_join_as_others_leave(llama, love):
    requests = []
    for i, prompt in enumerate(PROMPTS):
        ids = prompt_tokens(llama, prompt)
        sampling = Sampling(max_tokens=8 + 6 * i, temperature=0.0)
        requests.append(Request(ids, [(love, 4.0)] if i % 2 else (), sampling))
    seen = []
    batched = generate_batch(llama, requests, parallel=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for request, completion in zip(requests, batched):
        assert len(completion.tokens) == request.sampling.max_tokens or completion.finish_reason == "stop"
        assert solo_gap(llama, request.ids, request.steering, completion.tokens) <= SOLO_TOLERANCE


def test_sampled_completions_repeat_with_their_seeds(llama, love):
    ids = prompt_tokens(llama, PROMPTS[2])
    requests = [Request(ids, [(love, 4.0)] if i % 2 else (), Sampling(max_tokens=16, temperature=0.8, seed=i)) for i in range(4)]
    first = generate_batch(llama, requests, parallel=4)
    again = generate_batch(llama, requests, parallel=4)
    assert [c.text for c in first] == [c.text for c in again]
    assert len({c.text for c in first}) > 1


def test_prefix_is_reused_only_under_the_same_steering(llama, love):
    ids = prompt_tokens(llama, PROMPTS[0])
    batcher = Batcher(llama, 1)
    try:
        def one(request):
            handle = batcher.start(request)
            while batcher.busy:
                batcher.step()
            return handle.completion

        first = one(Request(ids, [(love, 4.0)], GREEDY))
        same = one(Request(ids, [(love, 4.0)], GREEDY))
        other = one(Request(ids, [(love, 2.0)], GREEDY))
    finally:
        batcher.close()
    assert first.n_reused == 0 and other.n_reused == 0
    assert same.n_reused == len(ids) - 1
    assert same.text == first.text


def test_logprobs_are_the_models_own_under_each_sequences_steering(llama, love):
    ids = [prompt_tokens(llama, p) for p in PROMPTS[:3]]
    steering = [[(love, 6.0)], [], [(love, -6.0)]]
    sampling = Sampling(max_tokens=16, temperature=0.9, seed=3)
    requests = [Request(i, s, sampling, logprobs=True) for i, s in zip(ids, steering)]
    batched = generate_batch(llama, requests + [Request(ids[0], (), sampling)], parallel=4)
    assert batched[-1].logprobs is None  # only when asked
    for request, completion in zip(requests, batched):
        assert len(completion.logprobs) == len(completion.tokens) > 0
        got = np.asarray(completion.logprobs)
        alone = solo_logprobs(llama, request.ids, request.steering, completion.tokens)
        assert np.all(got <= 0)
        assert np.abs(got - alone).max() <= LOGPROB_TOLERANCE
        assert abs(got.mean() - alone.mean()) <= MEAN_LOGPROB_TOLERANCE
    # The check can fail: under the opposite steering the same tokens are far less likely.
    opposite = solo_logprobs(llama, ids[0], steering[2], batched[0].tokens)
    assert np.mean(batched[0].logprobs) - opposite.mean() > 10 * MEAN_LOGPROB_TOLERANCE


def test_samples_of_one_prompt_share_its_evaluation(llama, love):
    ids = prompt_tokens(llama, PROMPTS[1])
    same = [Request(ids, [(love, 4.0)], Sampling(max_tokens=12, temperature=0.8, seed=i)) for i in range(3)]
    other = Request(ids, [(love, 2.0)], Sampling(max_tokens=12, temperature=0.8, seed=0))
    batched = generate_batch(llama, same + [other], parallel=4)
    assert [c.n_reused for c in batched] == [0, len(ids) - 1, len(ids) - 1, 0]  # shared only under the same steering
    for request, completion in zip(same, batched):
        assert solo_gap(llama, ids, request.steering, completion.tokens) <= 12, completion.text  # sampled, not greedy
    greedy = generate_batch(llama, [Request(ids, [(love, 4.0)], GREEDY)] * 2, parallel=2)
    assert greedy[1].n_reused == len(ids) - 1
    assert solo_gap(llama, ids, [(love, 4.0)], greedy[1].tokens) <= SOLO_TOLERANCE


@pytest.mark.parametrize("taken_over", [False, True])
def test_a_sample_whose_donor_is_cancelled_shares_what_was_evaluated(llama, love, taken_over):
    ids = prompt_tokens(llama, "Yesterday afternoon I went for a long walk to")
    assert len(ids) > 5
    batcher = Batcher(llama, 2, n_batch=4)  # the donor's prompt takes two steps
    try:
        first, second = (batcher.start(Request(ids, (), GREEDY)) for _ in range(2))
        batcher.step()  # the first evaluates 4 prompt tokens; the second waits for them
        batcher.cancel(first)
        if taken_over:  # its sequence goes to a request under other steering before the second copies
            third = batcher.start(Request(ids, [(love, 4.0)], GREEDY))
        while batcher.busy:
            batcher.step()
    finally:
        batcher.close()
    assert first.completion is None
    assert second.completion.n_reused == (0 if taken_over else 4)
    assert solo_gap(llama, ids, (), second.completion.tokens) <= SOLO_TOLERANCE
    if taken_over:
        assert third.completion.n_reused == 0
        assert solo_gap(llama, ids, [(love, 4.0)], third.completion.tokens) <= SOLO_TOLERANCE


def test_stop_strings_end_the_text_and_are_never_streamed(llama):
    ids = prompt_tokens(llama, PROMPTS[1])
    plain = generate_batch(llama, [Request(ids, (), GREEDY)])[0].text
    stop = plain.split()[2]
    batcher = Batcher(llama, 1)
    try:
        handle = batcher.start(Request(ids, (), GREEDY, stop=[stop]))
        pieces = []
        while batcher.busy:
            pieces += [event.piece for event in batcher.step()]
    finally:
        batcher.close()
    assert handle.completion.finish_reason == "stop"
    assert handle.completion.text == plain[: plain.find(stop)]
    assert "".join(pieces) == handle.completion.text


def test_cancel_frees_the_sequence_at_once(llama):
    ids = prompt_tokens(llama, PROMPTS[3])
    batcher = Batcher(llama, 1)
    try:
        long = batcher.start(Request(ids, (), Sampling(max_tokens=100, temperature=0.0)))
        batcher.step()
        queued = batcher.start(Request(ids, (), Sampling(max_tokens=4, temperature=0.0)))
        batcher.step()
        assert batcher.active == 1 and queued.completion is None
        batcher.cancel(long)
        assert batcher.active == 0
        while batcher.busy:
            batcher.step()
    finally:
        batcher.close()
    assert long.completion is None
    assert len(queued.completion.tokens) == 4


@pytest.mark.parametrize(
    "request_args, fragment",
    [
        (dict(ids=[]), "request.ids is empty"),
        (dict(ids=[1, 10**9]), "not a token id"),
        (dict(ids=[1, True]), "not a token id"),
        (dict(ids="hello"), "request.ids must be a list"),
        (dict(ids=[1] * 250, sampling=Sampling(max_tokens=48)), "exceeds the context"),
        (dict(ids=[1, 2], stop="x"), "request.stop must be a list"),
        (dict(ids=[1, 2], logprobs="yes"), "request.logprobs must be True or False"),
    ],
)
def test_bad_requests_are_refused_before_the_engine(llama, request_args, fragment):
    batcher = Batcher(llama, 1)
    try:
        with pytest.raises(InputError, match=fragment):
            batcher.start(Request(**request_args))
        assert batcher.busy == 0
    finally:
        batcher.close()


def test_overflowing_coefficient_is_named(llama, love):
    ids = prompt_tokens(llama, PROMPTS[0])
    with pytest.raises(InputError, match="overflows float32"):
        generate_batch(llama, [Request(ids, [(love, 1e39)], GREEDY)])


def test_closing_the_llama_closes_its_batchers():
    llm = load_llama(default_model_path(), n_ctx=64, n_threads=2)
    batcher = Batcher(llm, 2)
    batcher.start(Request(prompt_tokens(llm, "Hello"), (), GREEDY))
    llm.close()
    assert batcher.closed
    with pytest.raises(EngineError, match="closed"):
        batcher.step()


def test_stop_helpers():
    assert first_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert first_stop("abc", ["x", ""]) is None
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert np.isclose(held_back("ab", ["abc", "b"]), 2)


def test_close_from_another_thread_during_a_batch_is_safe():
    from helpers.misuse import run_alive

    prelude = """
import threading
from pyactadd.default_model import default_model_path
from pyactadd.errors import EngineError
from pyactadd.runtime.batch import Request, generate_batch
from pyactadd.runtime.generate import Sampling, load_llama, prompt_tokens
llm = load_llama(default_model_path(), n_ctx=256, n_threads=1)
ids = prompt_tokens(llm, "Once upon a time")
requests = [Request(ids, (), Sampling(max_tokens=200, temperature=0.8, seed=i)) for i in range(4)]
started, out = threading.Event(), {}

def generating():
    try:
        generate_batch(llm, requests, parallel=4, progress=None)
        out["finished"] = True
    except EngineError as exc:
        out["error"] = str(exc)
    finally:
        started.set()
"""
    body = """
    worker = threading.Thread(target=generating)
    worker.start()
    import time; time.sleep(1.0)
    llm.close()
    worker.join()
    print("generation stopped:", out.get("error"))
    try:
        generate_batch(llm, requests)
    except EngineError as exc:
        print("after close:", exc)
    """
    run_alive(prelude, body, ["generation stopped: this", "after close: this Llama is closed"])
