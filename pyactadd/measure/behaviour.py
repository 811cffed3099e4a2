"""What steering does to generated text, measured the paper's way: success rate, disfluency, significance.

For a set of openings, N completions per opening are generated under three conditions
with the same seeds (completion ``j`` of opening ``i`` gets seed ``seed + i * N + j`` in
every condition), all in continuous batches (:func:`pyactadd.runtime.batch.generate_batch`):

* **unsteered**: the opening as is;
* **steered**: the opening with the steering vectors in force (once per coefficient
  multiplier with ``coeffs``);
* **prompted**: the steering prompt (the vector's positive prompt text, or one given)
  prepended to the opening as plain text, unsteered: the paper's baseline.

Every opening is prefixed by the vectors' anchor token in every condition, so the only
difference between conditions is the condition. Each completion is scored by the task
(:mod:`pyactadd.measure.scoring`) and given a **disfluency**: its perplexity under the
unsteered model, conditioned on the opening alone (not the prompted prefix), computed in
llama.cpp by :class:`~pyactadd.measure.perplexity.BatchScorer`. An empty completion (the
model ended at once) has no perplexity and is left out of the disfluency numbers.

Statistics (:mod:`pyactadd.measure.stats`): success rate with a Wilson interval, paired
permutation p-values against unsteered and against prompted, and the disfluency's mean and
median with seeded bootstrap intervals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.measure.perplexity import BatchScorer
from pyactadd.measure.scoring import Task
from pyactadd.measure.stats import bootstrap_interval, paired_permutation_pvalue, wilson_interval
from pyactadd.runtime.generate import Sampling, common_anchor, prompt_tokens
from pyactadd.runtime.steering import Alignment
from pyactadd.vector.value import SteeringVector

DEFAULT_N = 2
"""Completions per opening: with the shipped sets (100+ openings) about 200 per condition."""

DEFAULT_MAX_TOKENS = 32
DEFAULT_TEMPERATURE = 0.7
DEFAULT_PARALLEL = 16
"""Sequences per llama_decode: on two CPU cores the default model's throughput stops growing about here."""

UNSTEERED, STEERED, PROMPTED = "unsteered", "steered", "prompted"


@dataclass
class Condition:
    """One condition's completions and their scores, in (opening, sample) order."""

    name: str
    coeff: float | None  # the multiplier of the steering coefficients; None without steering
    texts: list[str]
    tokens: list[tuple[int, ...]]
    success: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    disfluency: np.ndarray = field(default_factory=lambda: np.zeros(0))


def prompted_prefix(vectors: Sequence[tuple[SteeringVector, float]], text: str | None = None) -> str:
    """The text the prompted condition prepends: ``text``, else the vectors' positive prompts joined.

    Raises:
        InputError: no text given and a vector keeps no positive prompt (a converted file).
    """
    if text is not None:
        if not text.strip():
            raise InputError("the prompted text is empty: give --prompted-text a non-empty text")
        return text.strip()
    positives = [v.positive for v, _ in vectors]
    if any(p is None or not p.strip() for p in positives):
        raise InputError("a steering file keeps no positive prompt text: pass --prompted-text TEXT for the prompted baseline")
    return " ".join(p.strip() for p in positives)


def prompted_opening(prefix: str, opening: str) -> str:
    """``prefix`` then ``opening``, one space between them."""
    return f"{prefix} {opening.lstrip()}"


def check_openings(openings: Sequence[str], n: int) -> None:
    """Raises InputError on no openings or a count below 1."""
    if not openings:
        raise InputError("no openings to complete: give a prompt file with one opening a line")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"completions per opening must be a positive integer, got {n!r}")


def seeds_for(n_openings: int, n: int, seed: int) -> list[int]:
    """The seed of every completion, opening by opening: ``seed + i * n + j``."""
    return [seed + k for k in range(n_openings * n)]


def requests_for(ids: Sequence[Sequence[int]], n: int, sampling: Sampling, steering=(), align: Alignment | None = None) -> list:
    """One :class:`~pyactadd.runtime.batch.Request` per completion: ``n`` per prompt, seeds from ``sampling.seed``."""
    from dataclasses import replace

    from pyactadd.runtime.batch import Request

    seeds = seeds_for(len(ids), n, sampling.seed or 0)
    return [
        Request(ids=list(prompt), steering=list(steering), sampling=replace(sampling, seed=seeds[i * n + j]), align=align)
        for i, prompt in enumerate(ids)
        for j in range(n)
    ]


def completion_perplexities(scorer: BatchScorer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> np.ndarray:
    """Perplexity of each completion's tokens given its prompt's tokens, under the scorer's steering (none: unsteered).

    NaN for an empty completion.
    """
    result = np.full(len(completions), np.nan)
    chosen = [k for k, c in enumerate(completions) if len(c)]
    if not chosen:
        return result
    sequences = [list(prompts[k]) + list(completions[k]) for k in chosen]
    outputs = [range(len(prompts[k]) - 1, len(prompts[k]) - 1 + len(completions[k])) for k in chosen]
    plan = scorer.plan(sequences, outputs)
    try:
        for index, rows, lse in scorer.output_logprobs(plan):
            targets = np.asarray(completions[chosen[index]], dtype=np.int64)
            nll = lse - rows[np.arange(len(targets)), targets].astype(np.float64)
            result[chosen[index]] = math.exp(float(np.mean(nll)))
    finally:
        plan.close()
    return result


def condition_summary(condition: Condition, unsteered: Condition | None, prompted: Condition | None, seed: int = 0) -> dict:
    """A condition's numbers: completions, success rate and interval, p-values, disfluency."""
    successes = int(condition.success.sum())
    n = int(condition.success.size)
    out: dict = {
        "condition": condition.name,
        "coeff": condition.coeff,
        "n": n,
        "successes": successes,
        "success": wilson_interval(successes, n).as_dict(),
    }
    for key, other in (("p_vs_unsteered", unsteered), ("p_vs_prompted", prompted)):
        out[key] = None if other is None or other is condition else paired_permutation_pvalue(condition.success, other.success, seed=seed)
    finite = condition.disfluency[np.isfinite(condition.disfluency)]
    out["disfluency"] = {
        "n": int(finite.size),
        "mean": bootstrap_interval(finite, "mean", seed=seed).as_dict() if finite.size else None,
        "median": bootstrap_interval(finite, "median", seed=seed).as_dict() if finite.size else None,
    }
    return out


@dataclass
class BehaviourResult:
    """Every condition of one behavioural evaluation and how it was run; :meth:`as_dict` is ``eval --json``."""

    task: Task
    openings: list[str]
    n: int
    sampling: Sampling
    prefix: str
    anchor_id: int | None
    conditions: list[Condition]
    seconds: dict = field(default_factory=dict)
    n_tokens: int = 0

    def condition(self, name: str) -> Condition | None:
        """The first condition called ``name`` (None when there is none)."""
        return next((c for c in self.conditions if c.name == name), None)

    def summaries(self, seed: int = 0) -> list[dict]:
        """:func:`condition_summary` of every condition (unsteered, prompted, then each steered)."""
        unsteered, prompted = self.condition(UNSTEERED), self.condition(PROMPTED)
        return [condition_summary(c, unsteered, prompted, seed) for c in self.conditions]

    def as_dict(self, *, completions: bool = True) -> dict:
        out = {
            "task": self.task.name,
            "scorer": self.task.description,
            "n_openings": len(self.openings),
            "n_per_opening": self.n,
            "sampling": self.sampling.as_dict(),
            "seeds": "seed + opening_index * n_per_opening + sample",
            "prompted_text": self.prefix,
            "anchor_id": self.anchor_id,
            "conditions": self.summaries(self.sampling.seed or 0),
            "timing": {**self.seconds, "generated_tokens": self.n_tokens},
        }
        if completions:
            out["completions"] = [self.completion_rows(c) for c in self.conditions]
        return out

    def completion_rows(self, condition: Condition) -> dict:
        seeds = seeds_for(len(self.openings), self.n, self.sampling.seed or 0)
        rows = [
            {
                "opening": k // self.n,
                "seed": seeds[k],
                "text": text,
                "success": bool(condition.success[k]),
                "disfluency": None if not np.isfinite(condition.disfluency[k]) else float(condition.disfluency[k]),
            }
            for k, text in enumerate(condition.texts)
        ]
        return {"condition": condition.name, "coeff": condition.coeff, "items": rows}


@dataclass(frozen=True)
class Arm:
    """One condition to generate: a name, its coefficient multiplier, its steering, whether the prompt is prefixed."""

    name: str
    coeff: float | None = None
    steering: tuple = ()
    prompted: bool = False


def evaluate_behaviour(
    llama,
    scorer: BatchScorer,
    openings: Sequence[str],
    vectors: Sequence[tuple[SteeringVector, float]],
    task: Task,
    *,
    coeffs: Sequence[float] = (1.0,),
    n: int = DEFAULT_N,
    sampling: Sampling = Sampling(max_tokens=DEFAULT_MAX_TOKENS, temperature=DEFAULT_TEMPERATURE),
    parallel: int = DEFAULT_PARALLEL,
    align: Alignment | None = None,
    prompted_text: str | None = None,
    extra: Sequence[Arm] = (),
    progress: Callable[[int, int], None] | None = None,
) -> BehaviourResult:
    """Generate and score the unsteered, prompted and steered conditions (see the module docstring).

    Args:
        llama: a Llama from :func:`pyactadd.load_llama` (the generator makes its own context on it).
        scorer: an unsteered :class:`BatchScorer` on the same model, for disfluency.
        vectors: ``(vector, coeff)`` pairs summed as for ``pyactadd run``.
        coeffs: multipliers of every vector's coefficient, one steered condition each.
        prompted_text: what the prompted condition prepends (default: the vectors' positive prompts).
        extra: more conditions after the steered ones (e.g. random controls).
        progress: called with (done, total) completions.

    Raises:
        InputError: no vector or opening, a vector without a positive prompt and no ``prompted_text``.
        ModelMismatchError: a vector made for another model.
    """
    vectors = list(vectors)
    if not vectors:
        raise InputError("no steering vector: pass at least one --steer FILE")
    prefix = prompted_prefix(vectors, prompted_text)
    arms = [Arm(UNSTEERED), Arm(PROMPTED, prompted=True)]
    arms += [Arm(STEERED, c, tuple((v, k * c) for v, k in vectors)) for c in coeffs]
    anchor_id = common_anchor(vectors)
    return measure_arms(llama, scorer, openings, arms + list(extra), task, anchor_id=anchor_id, prefix=prefix,
                        n=n, sampling=sampling, parallel=parallel, align=align, progress=progress)


def measure_arms(
    llama,
    scorer: BatchScorer,
    openings: Sequence[str],
    arms: Sequence[Arm],
    task: Task,
    *,
    anchor_id: int | None,
    prefix: str,
    n: int,
    sampling: Sampling,
    parallel: int,
    align: Alignment | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BehaviourResult:
    """Generate every arm's completions in one continuous batch, then score success and disfluency.

    Raises:
        InputError: no openings, a bad count, or a vector made for another model.
    """
    check_openings(openings, n)
    for arm in arms:
        for vector, _ in arm.steering:
            vector.check_fits(scorer.fingerprint)
    started = time.perf_counter()
    ids = [prompt_tokens(llama, o, anchor_id=anchor_id) for o in openings]
    prompted_ids = [prompt_tokens(llama, prompted_opening(prefix, o), anchor_id=anchor_id) for o in openings]
    conditions = _generate(llama, arms, ids, prompted_ids, n, sampling, parallel, align, progress)
    generated = time.perf_counter()
    repeated = [prompt for prompt in ids for _ in range(n)]
    scorer.steering.clear()
    for condition in conditions:
        condition.success = np.asarray(task.score(condition.texts), dtype=bool)
        condition.disfluency = completion_perplexities(scorer, repeated, condition.tokens)
    seconds = {"generate": generated - started, "score": time.perf_counter() - generated}
    n_tokens = sum(len(t) for c in conditions for t in c.tokens)
    return BehaviourResult(task, list(openings), n, sampling, prefix, anchor_id, conditions, seconds, n_tokens)


def _generate(llama, arms, ids, prompted_ids, n: int, sampling: Sampling, parallel: int, align, progress) -> list[Condition]:
    """Every arm's completions from one continuous batch: the requests of all arms together."""
    from pyactadd.runtime.batch import generate_batch

    requests: list = []
    for arm in arms:
        prompts = prompted_ids if arm.prompted else ids
        requests += requests_for(prompts, n, sampling, arm.steering, align if arm.steering else None)
    completions = generate_batch(llama, requests, parallel=parallel, progress=progress)
    size = len(ids) * n
    conditions = []
    for k, arm in enumerate(arms):
        part = completions[k * size : (k + 1) * size]
        conditions.append(Condition(arm.name, arm.coeff, [c.text for c in part], [c.tokens for c in part]))
    return conditions
