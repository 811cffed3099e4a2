"""One check shared by the llama_lite tests: a LlamaLite forward against transformers' on the same weights."""

from __future__ import annotations

import torch

# Token ids from the default model's vocabulary, a real sentence and a plain range, batched.
IDS = [[504, 2365, 6354, 16438, 30, 253, 1535, 1029, 30, 5, 9, 1, 2, 3, 99], list(range(1, 16))]


def assert_same_forward(lite, reference, n_hidden: int = 31) -> None:
    """Every hidden state and the logits of ``lite`` equal ``reference``'s (measured 0.0: same float32 ops, same order)."""
    ids = torch.tensor(IDS)
    with torch.inference_mode():
        ours = lite(input_ids=ids, output_hidden_states=True)
        theirs = reference(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == n_hidden
    for layer, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), layer
    assert torch.allclose(ours.logits, theirs.logits, rtol=1e-5, atol=1e-4)
