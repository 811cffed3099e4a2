"""BatchScorer decodes on the Llama's raw context; misused from another thread it must raise
pyactadd's typed error and the process must live (each case runs in a subprocess).

Before the scorer held the Llama's guard, a ``close()`` during scoring freed the context
under a running ``llama_decode`` (a crash), and a steering change raced it.
"""

from __future__ import annotations

import pytest
from helpers.misuse import run_alive

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
