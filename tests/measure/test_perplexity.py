"""BatchScorer: sequences that share a prefix decode it once, with the numbers of one decode
per sequence; misused from another thread it must raise pyactadd's typed error and the
process must live (each case runs in a subprocess).

Before the scorer held the Llama's guard, a ``close()`` during scoring freed the context
under a running ``llama_decode`` (a crash), and a steering change raced it.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.misuse import run_alive

from pyactadd.measure.perplexity import BatchScorer, float32_copy
from pyactadd.vector.value import SteeringVector


def test_shared_prefixes_are_decoded_once_with_the_numbers_of_one_decode_each(default_model_path):
    # An opening with several continuations, two of them alike for a while and one repeated,
    # as eval --task scores them; and a sequence that shares only the first token.
    model = float32_copy(default_model_path)  # the batch shape moves Q4_1's roundings (test_eval)
    shared, single = BatchScorer(model, batch_tokens=1024), BatchScorer(model, max_sequences=1)
    opening = shared.tokenize("I went to the market this morning and")
    tails = [" bought some fresh bread.", " bought some apples for my mother.", " met an old friend.", " met an old friend.",
             " it rained all day long."]
    sequences = [opening + shared.tokenize(t, add_bos=False) for t in tails] + [shared.tokenize("A different sentence here.")]
    plan = shared.plan(sequences)
    distinct = {tuple(ids[: k + 1]) for ids in sequences for k in range(len(ids) - 1)}  # the last token is never decoded
    assert len(plan.batches) == 1 and plan.n_tokens == len(distinct) < sum(len(ids) - 1 for ids in sequences)
    row = SteeringVector(layers={6: np.ones((3, shared.fingerprint.n_embd), np.float32)}, fingerprint=shared.fingerprint)
    found = []
    try:
        for steering in ([], [(row, 2.0)]):  # shared rows are steered as each member would be
            for scorer in (shared, single):
                scorer.steering.set(steering)
            a = shared.token_nlls(plan, sequences)
            b = single.token_nlls(single.plan(sequences), sequences)
            assert max(np.abs(x - y).max() for x, y in zip(a, b)) < 0.01  # as for any batch (test_eval)
            np.testing.assert_array_equal(a[2], a[3])  # a repeated sequence: the same rows
            found.append(np.concatenate(a))
        assert np.abs(found[0] - found[1]).max() > 0.5  # the steering moves them
    finally:
        shared.close()
        single.close()

PRELUDE = """
import threading, numpy as np
from pyactadd.errors import EngineError
from pyactadd.measure.perplexity import BatchScorer
from pyactadd.vector.value import SteeringVector
scorer = BatchScorer(n_ctx=256, n_threads=1, max_sequences=4, batch_tokens=64)
ids = scorer.sentence_ids(["The cat sat on the mat and looked at the birds outside."] * 200, anchor_id=None)
plan = scorer.plan(ids)
row = SteeringVector(layers={6: np.ones((1, scorer.fingerprint.n_embd), np.float32)}, fingerprint=scorer.fingerprint, alignment="all")

def scoring(started, out):
    scorer.on_batch = lambda n: started.set()
    try:
        for _ in range(50):  # many runs: whatever the other thread does lands inside one
            scorer.perplexity(plan, ids)
        out["finished"] = True
    except EngineError as exc:
        out["error"] = str(exc)
    finally:
        started.set()

started, out = threading.Event(), {}
worker = threading.Thread(target=scoring, args=(started, out))
worker.start()
started.wait()
"""

CASES = {
    "close from another thread during scoring": (
        """
        scorer.close()
        worker.join()
        print("scoring stopped:", out.get("error"))
        try:
            scorer.perplexity(plan, ids)
        except EngineError as exc:
            print("after close:", exc)
        """,
        ["scoring stopped: this Llama is closed: load the model again", "after close: this Llama is closed"],
    ),
    "steering change from another thread during scoring": (
        """
        refused = 0
        while worker.is_alive() and refused < 5:
            try:
                scorer.steering.set([(row, 1.0)]); scorer.steering.clear()
            except EngineError as exc:
                refused += 1; message = str(exc)
        scorer.close(); worker.join()
        print("refused:", refused > 0, message)
        """,
        ["refused: True steering cannot change while this Llama is generating"],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_scorer_misuse_raises_a_typed_error_and_the_process_lives(case):
    run_alive(PRELUDE, *CASES[case])
