"""Measuring a steering vector the paper's way: perplexity ratios and next-token shifts, in llama.cpp.

* Perplexity of an on-target and an off-target sentence set, with and without steering,
  sentence by sentence (each sentence is its own sequence starting at position 0, so
  row ``p`` of a front-aligned vector lands on position ``p`` of every sentence), and
  the ratio steered/unsteered.
* For one prompt, the next-token distribution with and without steering: the tokens
  whose probability rises and falls most, and the largest terms of
  ``KL(steered || unsteered) = sum_t p_s(t) (log p_s(t) - log p_u(t))``.

Everything is computed from llama.cpp's logits with the steering engine in force
(:mod:`pyactadd.measure.perplexity`); nothing runs in PyTorch.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.measure.perplexity import DEFAULT_N_CTX, BatchScorer, Perplexity, scoring_model
from pyactadd.prompts.files import read_sentences
from pyactadd.runtime.steering import Alignment, parse_alignment
from pyactadd.vector.value import SteeringVector

DEFAULT_PROMPT = "I went up to my friend and said"
"""The paper's prompt for the wedding vector."""

DEFAULT_TOP = 10
"""Rows of each next-token table."""

DEFAULT_ON_SET, DEFAULT_OFF_SET = "weddings.txt", "shipping.txt"
"""The shipped on-target and off-target text sets ``eval`` and ``sweep`` score by default."""


def shipped_text(name: str) -> Path:
    """Path of a text set shipped in ``pyactadd/data`` (``weddings.txt``, ``shipping.txt``).

    Raises:
        InputError: no such shipped file.
    """
    resource = importlib.resources.files("pyactadd") / "data" / name
    if not resource.is_file():
        raise InputError(f"pyactadd ships no text set named {name!r}: use weddings.txt or shipping.txt")
    return Path(str(resource))


def text_set(path: str | os.PathLike[str] | None, default: str, *, what: str = "text file") -> tuple[Path, list[str]]:
    """``(path, sentences)`` of a text set: the file at ``path``, or the shipped set ``default``.

    Raises:
        InputError: see :func:`~pyactadd.prompts.files.read_sentences` and :func:`shipped_text`.
    """
    path = Path(path) if path is not None else shipped_text(default)
    return path, read_sentences(path, what=what)


@dataclass(frozen=True)
class SetScore:
    """One sentence set's perplexity without and with steering."""

    name: str  # "on" or "off"
    source: str  # the file, or a description
    unsteered: Perplexity
    steered: Perplexity

    @property
    def ratio(self) -> float:
        """Steered / unsteered perplexity: below 1 means steering made the text more likely."""
        return self.steered.ppl / self.unsteered.ppl

    def as_dict(self) -> dict:
        return {
            "file": self.source,
            "ppl_unsteered": self.unsteered.ppl,
            "ppl_steered": self.steered.ppl,
            "ratio": self.ratio,
            "mean_sentence_ppl_unsteered": self.unsteered.mean_sentence_ppl,
            "mean_sentence_ppl_steered": self.steered.mean_sentence_ppl,
            "n_sentences": self.unsteered.n_sentences,
            "n_tokens": self.unsteered.n_tokens,
        }


def make_scorer(
    model: str | os.PathLike[str] | None = None,
    *,
    fast: bool = False,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int | None = None,
) -> BatchScorer:
    """A :class:`BatchScorer` for evaluation.

    ``fast=False`` (exact): the model file as is, every sentence in its own
    ``llama_decode``, so each logit equals llama-cpp-python's own for that sentence.
    ``fast=True``: a float32 copy of a quantized model and many sentences per decode,
    what ``pyactadd sweep`` uses (faster; see :func:`pyactadd.measure.perplexity.float32_copy`
    for how the numbers differ).
    """
    from pyactadd.default_model import resolve_model

    path = resolve_model(model)
    if not path.is_file():
        raise InputError(f"{path} is not a GGUF file (llama.cpp runs GGUF models)")
    if fast:
        return BatchScorer(scoring_model(path, "auto"), n_ctx=n_ctx, n_threads=n_threads)
    return BatchScorer(path, n_ctx=n_ctx, n_threads=n_threads, max_sequences=1)


def eval_alignment(vectors: Sequence[tuple[SteeringVector, float]], align: Alignment | str | None) -> Alignment | None:
    """Check that the vectors can be applied from the front of every sentence.

    Raises:
        InputError: back alignment (it needs one prompt length; every sentence has its own).
    """
    chosen = parse_alignment(align) if align is not None else None
    for vector, _ in vectors:
        if (chosen or vector.alignment) == "back":
            raise InputError(
                "eval adds a vector's rows from the front of each sentence, but this vector is back-aligned: "
                "pass --align front (or an offset)"
            )
    return chosen


def anchor_for(vectors: Sequence[tuple[SteeringVector, float]]) -> int | None:
    """The anchor token the vectors were extracted with (prepended to every scored sentence)."""
    from pyactadd.runtime.generate import common_anchor

    return common_anchor(vectors)


def warn_about_sinks(scorer: BatchScorer, vectors: Sequence[tuple[SteeringVector, float]], anchor_id: int | None) -> None:
    """Warn when a vector's row 0 will land on each sentence's own first token, an attention sink."""
    from pyactadd.extract.sinks import warn_row0_on_sink

    warn_row0_on_sink(vectors, anchor_id, scorer.adds_bos, stacklevel=3)


def perplexity_pair(
    scorer: BatchScorer,
    sequences: Sequence[Sequence[int]],
    vectors: Sequence[tuple[SteeringVector, float]],
    *,
    align: Alignment | None = None,
) -> tuple[Perplexity, Perplexity]:
    """(unsteered, steered) perplexity of token sequences already prefixed with the anchor."""
    plan = scorer.plan(sequences)
    try:
        scorer.steering.clear()
        unsteered = scorer.perplexity(plan, sequences)
        scorer.steering.set(list(vectors), align=align)
        try:
            steered = scorer.perplexity(plan, sequences)
        finally:
            scorer.steering.clear()
    finally:
        plan.close()
    return unsteered, steered


def next_token_shift(
    scorer: BatchScorer,
    prompt: str,
    vectors: Sequence[tuple[SteeringVector, float]],
    *,
    anchor_id: int | None = None,
    align: Alignment | None = None,
    top: int = DEFAULT_TOP,
) -> dict:
    """How steering changes the distribution of the token after ``prompt``.

    Returns a dict with ``prompt``, ``prompt_tokens``, ``kl`` (nats), and lists
    ``rises``, ``falls`` (largest changes of probability) and ``kl_contributors`` (largest
    terms ``p_s (log p_s - log p_u)``), each entry ``{token, id, p_unsteered, p_steered,
    delta, kl_term}``.
    """
    if not prompt or not prompt.strip():
        raise InputError("empty prompt: give a non-empty text")
    ids = scorer.tokenize(prompt, anchor_id=anchor_id)
    scorer.steering.clear()
    unsteered = scorer.last_logprobs([ids])[0]
    scorer.steering.set(list(vectors), align=align)
    try:
        steered = scorer.last_logprobs([ids])[0]
    finally:
        scorer.steering.clear()
    p_u, p_s = np.exp(unsteered), np.exp(steered)
    delta = p_s - p_u
    kl_terms = p_s * (steered - unsteered)

    def entry(token_id: int) -> dict:
        return {
            "token": scorer.detokenize([token_id]),
            "id": token_id,
            "p_unsteered": float(p_u[token_id]),
            "p_steered": float(p_s[token_id]),
            "delta": float(delta[token_id]),
            "kl_term": float(kl_terms[token_id]),
        }

    order = np.argsort(delta, kind="stable")
    return {
        "prompt": prompt,
        "prompt_tokens": ids,
        "kl": float(kl_terms.sum()),
        "rises": [entry(int(t)) for t in order[::-1][:top] if delta[t] > 0],
        "falls": [entry(int(t)) for t in order[:top] if delta[t] < 0],
        "kl_contributors": [entry(int(t)) for t in np.argsort(-kl_terms, kind="stable")[:top]],
    }


def evaluate(
    vectors: Sequence[tuple[SteeringVector, float]],
    on: Sequence[str],
    off: Sequence[str],
    *,
    model: str | os.PathLike[str] | None = None,
    on_source: str = "on-target sentences",
    off_source: str = "off-target sentences",
    prompt: str | None = DEFAULT_PROMPT,
    top: int = DEFAULT_TOP,
    align: Alignment | str | None = None,
    fast: bool = False,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int | None = None,
    scorer: BatchScorer | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Perplexity ratios on an on-target and an off-target set, and the next-token shift for ``prompt``.

    Args:
        vectors: pairs ``(vector, coeff)`` whose rows sum, as for ``pyactadd run``.
        on, off: sentences (one per item), scored one by one.
        prompt: text for the next-token analysis (``None`` skips it).
        align: override the vectors' alignment (front or an offset; back is refused).
        fast: see :func:`make_scorer`; ignored when ``scorer`` is given.
        scorer: reuse a loaded :class:`BatchScorer` (it must be for the same model).
        on_step: called with "on", "off", "next-token" before each part (progress).

    Returns:
        ``{"on": {...}, "off": {...}, "anchor_id", "next_token"?}``; each set holds
        ``ppl_unsteered``, ``ppl_steered``, ``ratio`` and more (:meth:`SetScore.as_dict`).

    Raises:
        InputError: no vector, an empty set, a sentence longer than the context, back alignment.
        ModelMismatchError: a vector made for another model.
    """
    vectors = list(vectors)
    _check_inputs(vectors, on, off)
    chosen = eval_alignment(vectors, align)
    anchor_id = anchor_for(vectors)
    if scorer is None:
        scorer = make_scorer(model, fast=fast, n_ctx=n_ctx, n_threads=n_threads)
    for vector, _ in vectors:
        vector.check_fits(scorer.fingerprint)
    warn_about_sinks(scorer, vectors, anchor_id)
    result: dict = {"anchor_id": anchor_id}
    for name, sentences, source in (("on", on, on_source), ("off", off, off_source)):
        if on_step:
            on_step(name)
        sequences = scorer.sentence_ids(sentences, anchor_id=anchor_id, source=source)
        unsteered, steered = perplexity_pair(scorer, sequences, vectors, align=chosen)
        result[name] = SetScore(name, source, unsteered, steered).as_dict()
    if prompt is not None:
        if on_step:
            on_step("next-token")
        result["next_token"] = next_token_shift(scorer, prompt, vectors, anchor_id=anchor_id, align=chosen, top=top)
    return result


def _check_inputs(vectors: Sequence[tuple[SteeringVector, float]], on: Sequence[str], off: Sequence[str]) -> None:
    if not vectors:
        raise InputError("no steering vector: pass at least one --steer FILE")
    for name, sentences in (("on-target", on), ("off-target", off)):
        if not sentences:
            raise InputError(f"the {name} set is empty: give at least one sentence")
