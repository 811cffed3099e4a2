"""Choosing a layer and a coefficient automatically: a layer x coefficient sweep scored in llama.cpp.

For each cell ``(L, c)`` the rows of a steering vector at layer ``L`` (extracted for every
layer in one forward pass per prompt, or read from a file), scaled by ``c``, are put in
force through the engine and three numbers are measured on a *tuning* split:

* on-target perplexity ratio (steered / unsteered) of sentences that should become
  more likely;
* off-target perplexity ratio of sentences that should be left alone;
* a steering score: the log-probability gained by a set of target tokens over the first
  ``score_positions`` generated positions of a few neutral prompts (teacher-forced on the
  unsteered greedy continuation), averaged, in nats.

The recommended cell is the one with the lowest on-target ratio (the largest on-target
gain) among the cells whose off-target ratio stays within ``1 + budget`` and whose
on-target ratio is below 1. It is then checked on the *held-out* split (sentences the
choice never saw) next to a norm-matched random control: the same per-position row
norms with random directions, the paper's sanity check.

Sentence scoring follows :mod:`pyactadd.measure.perplexity`: each sentence is its own sequence,
prefixed by the vector's anchor token, and the anchor is never a prediction target.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.files import atomic_write_text
from pyactadd.native import llama_cpp_module
from pyactadd.vector.layers import MAX_LAYER, check_layer
from pyactadd.measure.perplexity import BatchScorer, Perplexity, Plan
from pyactadd.runtime.logits import logsumexp_rows
from pyactadd.vector.value import SteeringVector

DEFAULT_COEFFS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Six coefficients, doubling, around the scale where a prompt-pair difference row is as large
as a typical residual row (c = 1); the measurements behind the range are in docs/performance.md."""

DEFAULT_BUDGET = 0.05
"""Largest allowed rise of off-target perplexity (5 %)."""

PRUNE_FACTOR = 1.0
"""With pruning, larger coefficients of the same sign at a layer are skipped once a cell's
off-target ratio exceeds ``1 + PRUNE_FACTOR * budget``: they cannot be recommended, since
off-target perplexity only grows with the coefficient from there (observed on every layer of
the default model's full grid; docs/performance.md has how many cells it skips)."""

DEFAULT_PROMPTS = (
    "I went up to my friend and said",
    "Let me tell you about my weekend.",
    "The best thing that happened this year was",
    "Yesterday afternoon we",
    "Here is what I think about",
    "My favourite memory is",
)
"""Neutral prompts for the steering score (the first is the paper's)."""

DEFAULT_SCORE_POSITIONS = 8
"""Generated positions the steering score averages over."""

DEFAULT_N_TARGETS = 12
"""Target tokens picked from the on-target text when none are given."""

DEFAULT_CONTROLS = 3
"""Random control vectors evaluated at the recommended cell."""

JSON_NAME, CSV_NAME, PNG_NAME = "sweep.json", "sweep.csv", "sweep.png"

CSV_COLUMNS = (
    "layer", "coeff", "status", "on_ppl", "off_ppl", "on_ratio", "off_ratio", "score", "within_budget", "on_log_se",
    "off_log_se", "seconds", "decode_seconds",
)


# ---------------------------------------------------------------- parsing


# ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
_LAYER_ITEM = re.compile(r"\s*([0-9]+)\s*(?:[-:]\s*([0-9]+)\s*(?::\s*([0-9]+)\s*)?)?", re.ASCII)


def parse_layers(spec: str | None, n_layer: int | None) -> list[int]:
    """Layers from ``spec``: ``all`` (or None), numbers and inclusive ranges, comma-separated.

    ``"1-29"``, ``"2,4,8"``, ``"2:29:3"`` (2, 5, ..., 29), ``"8-20:4"`` (8, 12, 16, 20).
    With ``n_layer=None`` (the model not known yet) only the syntax is checked, layers
    against ``1 .. MAX_LAYER``, and ``all`` gives ``[]``. Both ends of a range are checked
    before it is expanded.

    Raises:
        InputError: the spec does not parse, or names a layer outside ``1 .. n_layer - 1``.
    """
    if spec is None or spec.strip().lower() == "all":
        return list(range(1, n_layer)) if n_layer is not None else []
    hint = "use numbers and ranges such as 1-29, 2,4,8 or 2:29:3 (from:to:step, both ends included)"
    layers: set[int] = set()
    for item in spec.split(","):
        match = _LAYER_ITEM.fullmatch(item)
        if not match:
            raise InputError(f"cannot parse layers {spec!r}: {item.strip()!r} is not a layer or a range; {hint}")
        start, stop, step = (_layer_number(group) for group in match.groups())
        stop = start if stop is None else stop
        if step == 0 or start > stop:
            raise InputError(f"cannot parse layers {spec!r}: {item.strip()!r} is an empty range; {hint}")
        for layer in (start, stop):
            _check_layer_bound(layer, n_layer)
        layers.update(range(start, stop + 1, step or 1))
    return sorted(layers)


def _layer_number(digits: str | None) -> int | None:
    # A number too long to be a layer is capped before int() (which refuses over 4300 digits).
    return None if digits is None else int(digits) if len(digits) <= 9 else 10**9


def _check_layer_bound(layer: int, n_layer: int | None) -> None:
    if n_layer is not None:
        check_layer(layer, n_layer)
    elif layer < 1:
        raise InputError(f"layer {layer} is out of range: layers start at 1 (L is the residual stream entering block L)")
    elif layer > MAX_LAYER:
        raise InputError(f"layer {layer} is out of range: no model has that many blocks (layers are 1 to n_layer - 1)")


def parse_coeffs(text: str | Sequence[float] | None) -> list[float]:
    """Coefficients: comma-separated numbers and inclusive ranges ``from:to:step`` (``0.5:4:0.5``).

    Raises:
        InputError: an item that is not a finite non-zero number or a valid range.
    """
    if text is None:
        return list(DEFAULT_COEFFS)
    if not isinstance(text, str):
        items = list(text)
        values = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float, np.floating, np.integer)):
                raise InputError(f"coefficient must be a number, got {item!r}")
            values.append(float(item))
        return _checked_coeffs(values, repr(items))
    hint = "use numbers and ranges such as 0.5,1,2,4 or 0.5:4:0.5 (from:to:step, both ends included)"
    values = []
    for item in text.split(","):
        item = item.strip()
        parts = [part.strip() for part in item.split(":")]
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            raise InputError(f"cannot parse coefficients {text!r}: {item!r} is not a number; {hint}") from None
        if len(numbers) == 1:
            values.append(numbers[0])
        elif len(numbers) == 3:
            start, stop, step = numbers
            if not all(math.isfinite(x) for x in numbers) or step <= 0 or start > stop:
                raise InputError(f"cannot parse coefficients {text!r}: {item!r} is not a range with a positive step; {hint}")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 1000:
                raise InputError(f"coefficient range {item!r} has {count} values: use a larger step")
            values.extend(round(start + k * step, 12) for k in range(count))
        else:
            raise InputError(f"cannot parse coefficients {text!r}: {item!r} is neither a number nor from:to:step; {hint}")
    return _checked_coeffs(values, repr(text))


def _checked_coeffs(values: list[float], shown: str) -> list[float]:
    if not values:
        raise InputError(f"no coefficients in {shown}")
    for value in values:
        if not math.isfinite(value):
            raise InputError(f"coefficient {value} in {shown} must be a finite number")
        if value == 0:
            raise InputError(f"coefficient 0 in {shown} means no steering: leave it out")
    return sorted(set(values))


def parse_budget(value: str | float) -> float:
    """An off-target budget in percent (``5``, ``"5%"``, ``"2.5"``) as a fraction (0.05).

    Raises:
        InputError: not a number, negative, or absurdly large.
    """
    text = str(value).strip().removesuffix("%").strip()
    try:
        percent = float(text)
    except ValueError:
        raise InputError(f"cannot parse budget {value!r}: give a percentage such as 5 or 2.5%") from None
    if not math.isfinite(percent) or percent < 0 or percent > 1000:
        raise InputError(f"budget {value!r} must be a percentage between 0 and 1000")
    return percent / 100.0


# ---------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (layer, coefficient) of the grid and what was measured there (on the tuning split)."""

    layer: int
    coeff: float
    status: str = "pending"  # "ok", "skipped" (pruned) or "pending" (not reached: interrupted)
    on_ppl: float | None = None
    off_ppl: float | None = None
    on_ratio: float | None = None
    off_ratio: float | None = None
    score: float | None = None
    on_log_se: float | None = None  # standard error of log(on_ratio) over sentences
    off_log_se: float | None = None
    seconds: float | None = None
    decode_seconds: float | None = None
    # Per-sentence change of on-target NLL (nats), for paired comparisons between cells; not written out.
    on_deltas: np.ndarray | None = field(default=None, repr=False, compare=False)

    def within(self, budget: float) -> bool:
        """Whether off-target perplexity rose by at most ``budget`` (evaluated cells only)."""
        return self.status == "ok" and self.off_ratio is not None and self.off_ratio <= 1.0 + budget

    def as_dict(self, budget: float) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "on_deltas"}
        out["within_budget"] = self.within(budget) if self.status == "ok" else None
        return out


def recommend(cells: Sequence[Cell], budget: float, token_counts: np.ndarray | None = None) -> Cell | None:
    """The cell with the largest on-target gain among those within the off-target budget.

    Candidates: evaluated cells with ``off_ratio <= 1 + budget`` and ``on_ratio < 1``. Two
    cells' gains measured on a few dozen sentences can differ by less than the noise: a
    candidate counts as tied with the best one when its ``log(on_ratio)`` is within one
    standard error of the paired difference (the same sentences under both cells, from
    ``on_deltas`` and ``token_counts``; without them no tie is assumed), and among the tied
    cells the lowest off-target ratio wins; then the larger gain, the smaller coefficient,
    the lower layer.
    """
    candidates = [c for c in cells if c.within(budget) and c.on_ratio is not None and c.on_ratio < 1.0]
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (c.on_ratio, c.off_ratio, abs(c.coeff), c.layer))

    def tied(cell: Cell) -> bool:
        gap = math.log(cell.on_ratio) - math.log(best.on_ratio)
        if cell is best or gap <= 0:
            return True
        if token_counts is None or cell.on_deltas is None or best.on_deltas is None:
            return False
        return gap <= paired_se(cell.on_deltas - best.on_deltas, token_counts)

    return min((c for c in candidates if tied(c)), key=lambda c: (c.off_ratio, c.on_ratio, abs(c.coeff), c.layer))


def paired_se(deltas: np.ndarray, token_counts: np.ndarray) -> float:
    """Standard error of ``sum(deltas) / sum(token_counts)`` over sentences (a ratio estimator).

    ``deltas[s]`` is sentence ``s``'s change of total NLL, ``token_counts[s]`` its scored
    tokens; the estimate is a log perplexity ratio and its standard error is
    ``sqrt(S / (S - 1) * sum_s (d_s - r n_s)^2) / sum_s n_s``.
    """
    d = np.asarray(deltas, dtype=np.float64)
    n = np.asarray(token_counts, dtype=np.float64)
    if len(d) < 2 or n.sum() <= 0:
        return float("nan")
    r = d.sum() / n.sum()
    return float(math.sqrt(len(d) / (len(d) - 1) * np.sum((d - r * n) ** 2)) / n.sum())


def norm_matched_random(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows with the same per-row L2 norms as ``rows`` and independent random (Gaussian) directions."""
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    directions = rng.standard_normal(rows.shape)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return (directions * norms[:, None]).astype(np.float32)


def split_sentences(sentences: Sequence[str], holdout: bool) -> tuple[list[str], list[str]]:
    """(tuning, held-out): even-numbered lines (1st, 3rd, ...) and odd-numbered ones; all and none without holdout."""
    sentences = list(sentences)
    if not holdout:
        return sentences, []
    return sentences[0::2], sentences[1::2]


def default_targets(
    scorer: BatchScorer,
    on: Sequence[str],
    off: Sequence[str],
    *,
    positive: str | None = None,
    negative: str | None = None,
    n: int = DEFAULT_N_TARGETS,
) -> list[int]:
    """Target tokens for the steering score when none are given.

    The positive prompt's tokens that the negative prompt lacks, then the on-target text's
    most frequent word tokens (at least 3 letters, at least twice) that never occur in the
    off-target text.
    """
    targets: list[int] = []
    if positive:
        negative_ids = set(scorer.tokenize(negative, add_bos=False)) if negative else set()
        for token in scorer.tokenize(positive, add_bos=False):
            if token not in negative_ids and _is_word(scorer.detokenize([token])) and token not in targets:
                targets.append(token)
    on_counts: dict[int, int] = {}
    off_seen: set[int] = set()
    for sentence in off:
        off_seen.update(scorer.tokenize(sentence, add_bos=False))
    for sentence in on:
        for token in scorer.tokenize(sentence, add_bos=False):
            on_counts[token] = on_counts.get(token, 0) + 1
    ranked = sorted(
        (token for token, count in on_counts.items() if count >= 2 and token not in off_seen and _is_word(scorer.detokenize([token]))),
        key=lambda token: (-on_counts[token], token),
    )
    for token in ranked:
        if len(targets) >= n:
            break
        if token not in targets:
            targets.append(token)
    if not targets:
        raise InputError("found no target tokens for the steering score: pass --targets WORDS")
    return targets


def targets_from_words(scorer: BatchScorer, words: Sequence[str]) -> list[int]:
    """The first token of each word as it appears mid-sentence (with a leading space)."""
    targets: list[int] = []
    for word in words:
        word = word.strip()
        if not word:
            continue
        token = scorer.tokenize(" " + word, add_bos=False)[0]
        if token not in targets:
            targets.append(token)
    if not targets:
        raise InputError("no target words given: pass words such as --targets 'wedding,bride,marriage'")
    return targets


def _is_word(text: str) -> bool:
    stripped = text.strip()
    return len(stripped) >= 3 and stripped.isalpha()


# ---------------------------------------------------------------- measuring


@dataclass
class _SetPlan:
    """Tokenized on/off sentences of one split, packed once."""

    n_on: int
    sequences: list[list[int]]
    plan: Plan | None

    def sentence_nlls(self, scorer: BatchScorer) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-sentence token NLLs of the on-target and the off-target sentences."""
        nlls = scorer.token_nlls(self.plan, self.sequences)
        return nlls[: self.n_on], nlls[self.n_on :]


def sentence_deltas(steered: Sequence[np.ndarray], unsteered: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sentence change of total NLL, and scored tokens, for sentences with a target."""
    pairs = [(a.sum() - b.sum(), len(b)) for a, b in zip(steered, unsteered) if len(b)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.float64)


class Meter:
    """Measures one steering setting: perplexities of a split and the steering score.

    Built once per sweep: it tokenizes and packs the sentences and prompts, generates the
    unsteered continuations and records the unsteered baseline.
    """

    def __init__(
        self,
        scorer: BatchScorer,
        *,
        anchor_id: int | None,
        tune: tuple[Sequence[str], Sequence[str]],
        holdout: tuple[Sequence[str], Sequence[str]],
        prompts: Sequence[str],
        targets: Sequence[int],
        score_positions: int = DEFAULT_SCORE_POSITIONS,
        sources: tuple[str, str] = ("on-target set", "off-target set"),
    ) -> None:
        self.scorer = scorer
        self.anchor_id = anchor_id
        self.prompts = list(prompts)
        self.score_positions = score_positions
        self.targets = np.asarray(list(targets), dtype=np.int64)
        self.splits: dict[str, _SetPlan] = {}
        for name, (on, off) in (("tune", tune), ("holdout", holdout)):
            if not on and not off:
                continue
            if not on or not off:
                raise InputError(f"the {name} split needs both on-target and off-target sentences")
            sequences = scorer.sentence_ids(on, anchor_id=anchor_id, source=sources[0]) + scorer.sentence_ids(
                off, anchor_id=anchor_id, source=sources[1]
            )
            self.splits[name] = _SetPlan(len(on), sequences, scorer.plan(sequences))
        if "tune" not in self.splits:
            raise InputError("no sentences to tune on")
        if score_positions < 1:
            raise InputError(f"score positions must be at least 1, got {score_positions}")
        if not prompts:
            raise InputError("no prompts for the steering score")
        prompt_ids = [scorer.tokenize(p, anchor_id=anchor_id) for p in prompts]
        scorer.steering.clear()
        self.continuations = scorer.greedy(prompt_ids, score_positions)
        self.prompt_sequences = [ids + cont[:-1] for ids, cont in zip(prompt_ids, self.continuations)]
        outputs = [range(len(ids) - 1, len(ids) - 1 + score_positions) for ids in prompt_ids]
        self.prompt_plan = scorer.plan(self.prompt_sequences, outputs)
        self.baseline = {name: self._perplexities(name) for name in self.splits}
        self.baseline_target_logprob = self._target_logprobs()

    def token_counts(self, split: str = "tune") -> np.ndarray:
        """Scored tokens of each on-target sentence of ``split`` that has one (the weights of :func:`paired_se`)."""
        nlls = self.baseline[split]["on_nlls"]
        return sentence_deltas(nlls, nlls)[1]

    def _perplexities(self, split: str) -> dict:
        on, off = self.splits[split].sentence_nlls(self.scorer)
        return {"on_nlls": on, "off_nlls": off, "on": Perplexity.of(on), "off": Perplexity.of(off)}

    def _target_logprobs(self) -> np.ndarray:
        """log P(any target token) at every scored prompt position, flattened."""
        out: list[np.ndarray] = [np.empty(0)] * len(self.prompt_sequences)
        for index, rows, lse in self.scorer.output_logprobs(self.prompt_plan):
            out[index] = logsumexp_rows(np.ascontiguousarray(rows[:, self.targets])) - lse
        return np.concatenate(out)

    def measure(self, split: str = "tune", *, score: bool = True) -> dict:
        """Perplexities and ratios on ``split`` (and the steering score) under the steering in force.

        ``on_log_se`` and ``off_log_se`` are the standard errors of the log ratios over
        sentences (:func:`paired_se`); ``on_deltas`` the per-sentence on-target NLL changes.
        """
        now = self._perplexities(split)
        base = self.baseline[split]
        result = {
            "on_ppl": now["on"].ppl,
            "off_ppl": now["off"].ppl,
            "on_ratio": now["on"].ppl / base["on"].ppl,
            "off_ratio": now["off"].ppl / base["off"].ppl,
        }
        on_deltas, on_counts = sentence_deltas(now["on_nlls"], base["on_nlls"])
        off_deltas, off_counts = sentence_deltas(now["off_nlls"], base["off_nlls"])
        result["on_log_se"] = paired_se(on_deltas, on_counts)
        result["off_log_se"] = paired_se(off_deltas, off_counts)
        result["on_deltas"] = on_deltas
        if score:
            result["score"] = float(np.mean(self._target_logprobs() - self.baseline_target_logprob))
        return result

    def close(self) -> None:
        """Free the packed batches."""
        for split in self.splits.values():
            split.plan.close()
        self.prompt_plan.close()


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    """Everything a sweep measured; :meth:`as_dict` is what ``sweep.json`` holds."""

    cells: list[Cell]
    budget: float
    info: dict = field(default_factory=dict)  # model, vector, split, score settings, baseline
    complete: bool = False
    recommended: Cell | None = None
    holdout: dict | None = None  # the recommended cell measured on the held-out split
    controls: list[dict] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    base_vector: SteeringVector | None = None
    on_token_counts: np.ndarray | None = None  # scored tokens of each on-target tuning sentence

    def best_so_far(self) -> Cell | None:
        """The recommendation among the cells evaluated so far."""
        return recommend(self.cells, self.budget, self.on_token_counts)

    def control_summary(self) -> dict | None:
        """Mean ratios and score of the random controls, beside the real vector's on the same split."""
        if not self.controls:
            return None
        keys = ("on_ratio", "off_ratio", "score")
        return {
            "split": self.controls[0]["split"],
            "n": len(self.controls),
            **{f"mean_{key}": float(np.mean([c[key] for c in self.controls])) for key in keys},
            "runs": self.controls,
        }

    def recommended_vector(self) -> SteeringVector:
        """The recommended layer's rows times the recommended coefficient, as a one-layer vector.

        Raises:
            InputError: no cell was recommended.
        """
        cell = self.recommended or self.best_so_far()
        if cell is None or self.base_vector is None:
            raise InputError(
                f"no cell lowers on-target perplexity while keeping off-target perplexity within +{self.budget:.0%}: "
                "nothing to write; try other layers, smaller coefficients or a larger --budget"
            )
        base = self.base_vector
        extra = dict(base.extra)
        zeroed = {cell.layer: base.zeroed_rows[cell.layer]} if cell.layer in base.zeroed_rows else {}
        extra["sweep_budget"] = float(self.budget)
        if cell.on_ratio is not None:
            extra["sweep_on_ratio"] = float(cell.on_ratio)
            extra["sweep_off_ratio"] = float(cell.off_ratio)
        single = dataclasses.replace(base, layers={cell.layer: base.layers[cell.layer]}, extra=extra, zeroed_rows=zeroed)
        return single * cell.coeff

    def as_dict(self) -> dict:
        recommended = None
        cell = self.recommended or (self.best_so_far() if not self.complete else None)
        if cell is not None:
            recommended = {
                "layer": cell.layer,
                "coeff": cell.coeff,
                "tune": {
                    k: getattr(cell, k) for k in ("on_ratio", "off_ratio", "score", "on_ppl", "off_ppl", "on_log_se", "off_log_se")
                },
                "holdout": self.holdout,
                "final": self.recommended is not None,
            }
            if self.holdout is not None:
                recommended["holdout_within_budget"] = self.holdout["off_ratio"] <= 1 + self.budget
        return {
            "complete": self.complete,
            **self.info,
            "budget": self.budget,
            "recommended": recommended,
            "control": self.control_summary(),
            "timing": self.timing,
            "cells": [c.as_dict(self.budget) for c in self.cells],
        }

    def write(self, out_dir: str | os.PathLike[str]) -> None:
        """Write ``sweep.json`` and ``sweep.csv`` to ``out_dir``, each atomically.

        Raises:
            InputError: a file cannot be written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / JSON_NAME, json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n", error=InputError)
        atomic_write_text(out / CSV_NAME, self.csv_text(), error=InputError)

    def csv_text(self) -> str:
        """What ``sweep.csv`` holds: a header of :data:`CSV_COLUMNS`, then one row per cell."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for cell in self.cells:
            row = cell.as_dict(self.budget)
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
        return buffer.getvalue()


def grid_order(layers: Sequence[int], coeffs: Sequence[float]) -> list[Cell]:
    """The grid's cells in the order they are measured.

    Layer by layer; within a layer, coefficients by growing magnitude, each sign apart, so
    that pruning can skip the larger ones.
    """
    return [
        Cell(layer, coeff)
        for layer in layers
        for sign in (1, -1)
        for coeff in sorted((c for c in coeffs if np.sign(c) == sign), key=abs)
    ]


def run_sweep(
    base: SteeringVector,
    on: Sequence[str],
    off: Sequence[str],
    *,
    scorer: BatchScorer,
    layers: Sequence[int] | None = None,
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    budget: float = DEFAULT_BUDGET,
    holdout: bool = True,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    targets: Sequence[int] | None = None,
    score_positions: int = DEFAULT_SCORE_POSITIONS,
    n_controls: int = DEFAULT_CONTROLS,
    seed: int = 0,
    prune: bool = True,
    out_dir: str | os.PathLike[str] | None = None,
    info: dict | None = None,
    sources: tuple[str, str] = ("on-target set", "off-target set"),
    on_cell: Callable[[Cell, SweepResult], None] | None = None,
) -> SweepResult:
    """Sweep ``base``'s layers x ``coeffs``; recommend a cell; check it on held-out sentences and against random controls.

    Args:
        base: a front-aligned vector with rows for every layer to sweep (coefficient 1),
            e.g. ``extract(pos, neg, layers=range(1, n_layer), anchor="bos")``.
        on, off: on-target and off-target sentences; with ``holdout`` the choice uses the
            even-numbered ones and the odd-numbered ones check it.
        scorer: the llama.cpp scorer (see :class:`~pyactadd.measure.perplexity.BatchScorer`).
        layers: the layers of ``base`` to sweep (default: all of them).
        budget: largest allowed off-target perplexity rise (0.05 = 5 %).
        targets: token ids of the steering score (default: :func:`default_targets`).
        n_controls: norm-matched random vectors at the recommended cell (0: none).
        prune: skip larger coefficients at a layer once one is out of the off-target budget (:data:`PRUNE_FACTOR`).
        out_dir: write ``sweep.json`` and ``sweep.csv`` there after every cell (atomically).
        info: extra keys for the JSON (model, prompts, ...).
        on_cell: called after every cell (evaluated or skipped), e.g. to advance a progress bar.

    Returns:
        The :class:`SweepResult`. Ctrl-C (KeyboardInterrupt) stops the sweep: the result has
        ``complete=False``, the files hold every cell finished so far, and it is returned
        (not raised), so the caller can report the best cell so far.

    Raises:
        InputError: bad settings (layers not in ``base``, a back-aligned vector, empty sets).
    """
    started = time.perf_counter()
    layers, coeffs = _checked_grid(base, scorer, layers, coeffs, budget)
    tune, held = _split(on, off, holdout)
    if targets is None:
        targets = default_targets(scorer, *tune, positive=base.positive, negative=base.negative)
    from pyactadd.measure.evaluation import warn_about_sinks

    warn_about_sinks(scorer, [(base, 1.0)], base.anchor_id)
    result = SweepResult(cells=grid_order(layers, coeffs), budget=budget, base_vector=base, info=dict(info or {}))
    run = _Run(scorer, result, out_dir, on_cell, decode_start=scorer.decode_seconds)
    try:
        run.meter = Meter(
            scorer, anchor_id=base.anchor_id, tune=tune, holdout=held, prompts=prompts, targets=targets,
            score_positions=score_positions, sources=sources,
        )
        result.info.update(_run_info(run.meter, layers=layers, coeffs=coeffs, prune=prune, holdout=holdout))
        result.on_token_counts = run.meter.token_counts("tune")
        result.timing["baseline_seconds"] = time.perf_counter() - started
        run.save()
        run.grid(prune)
        run.check_recommended(n_controls, seed)
        result.complete = True
    except KeyboardInterrupt:
        scorer.steering.clear()
        result.complete = False
    finally:
        run.finish(time.perf_counter() - started)
    return result


def _checked_grid(
    base: SteeringVector, scorer: BatchScorer, layers: Sequence[int] | None, coeffs: Sequence[float], budget: float
) -> tuple[list[int], list[float]]:
    """The layers and coefficients to sweep, once ``base``, the model and the budget are known to fit."""
    if base.alignment == "back":
        raise InputError("the sweep adds rows from the front of every sentence: use a front-aligned vector")
    layers = list(layers) if layers is not None else base.layer_ids
    missing = [layer for layer in layers if layer not in base.layers]
    if missing:
        raise InputError(f"the vector has no rows for layers {missing}: it has layers {base.layer_ids}")
    coeffs = parse_coeffs(list(coeffs))
    base.check_fits(scorer.fingerprint)
    if not 0 <= budget <= 10:
        raise InputError(f"budget must be a fraction between 0 and 10, got {budget}")
    return layers, coeffs


def _split(on: Sequence[str], off: Sequence[str], holdout: bool) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """((tuning on, tuning off), (held-out on, held-out off)), see :func:`split_sentences`."""
    tune_on, hold_on = split_sentences(on, holdout)
    tune_off, hold_off = split_sentences(off, holdout)
    if holdout and (not hold_on or not hold_off):
        raise InputError("holding out half the sentences needs at least 2 on-target and 2 off-target sentences")
    return (tune_on, tune_off), (hold_on, hold_off)


def _run_info(meter: Meter, *, layers: list[int], coeffs: list[float], prune: bool, holdout: bool) -> dict:
    """What ``sweep.json`` records about the run's settings, splits, steering score and baseline."""
    scorer = meter.scorer

    def count(split: str, part: int) -> int:
        plan = meter.splits.get(split)
        return 0 if plan is None else (plan.n_on if part == 0 else len(plan.sequences) - plan.n_on)

    return {
        "anchor_id": meter.anchor_id,
        "layers": layers,
        "coeffs": coeffs,
        "prune": prune,
        "split": {
            "choose_on": "even-numbered lines (1st, 3rd, ...)" if holdout else "all lines",
            "held_out": "odd-numbered lines (2nd, 4th, ...)" if holdout else None,
            "n_on_tune": count("tune", 0),
            "n_off_tune": count("tune", 1),
            "n_on_holdout": count("holdout", 0),
            "n_off_holdout": count("holdout", 1),
        },
        "score": {
            "prompts": list(meter.prompts),
            "positions": meter.score_positions,
            "targets": [{"id": int(t), "token": scorer.detokenize([t])} for t in meter.targets],
            "unsteered_continuations": [scorer.detokenize(c) for c in meter.continuations],
        },
        "baseline": {
            split: {key: numbers[key].as_dict() for key in ("on", "off")} for split, numbers in meter.baseline.items()
        },
    }


@dataclass
class _Run:
    """One sweep in progress: the scorer, the result being filled, where it is written."""

    scorer: BatchScorer
    result: SweepResult
    out_dir: str | os.PathLike[str] | None
    on_cell: Callable[[Cell, SweepResult], None] | None
    decode_start: float = 0.0
    meter: Meter | None = None

    def save(self) -> None:
        if self.out_dir is not None:
            self.result.write(self.out_dir)

    def measured(self, vector: SteeringVector, coeff: float, split: str, *, score: bool = True) -> dict:
        """The meter's numbers on ``split`` with ``vector`` x ``coeff`` in force (cleared afterwards)."""
        self.scorer.steering.set([(vector, coeff)], align="front")
        try:
            return self.meter.measure(split, score=score)
        finally:
            self.scorer.steering.clear()

    def grid(self, prune: bool) -> None:
        """Measure every cell in order, skipping the ones pruning rules out; save after each."""
        base, budget = self.result.base_vector, self.result.budget
        vectors = {layer: one_layer(base, layer) for layer in {c.layer for c in self.result.cells}}
        skip_from: dict[tuple[int, int], float] = {}  # (layer, sign) -> |coeff| from which cells are skipped
        for cell in self.result.cells:
            sign = int(np.sign(cell.coeff))
            limit = skip_from.get((cell.layer, sign))
            if limit is not None and abs(cell.coeff) >= limit:
                cell.status = "skipped"
            else:
                t0, d0 = time.perf_counter(), self.scorer.decode_seconds
                for key, value in self.measured(vectors[cell.layer], cell.coeff, "tune").items():
                    setattr(cell, key, value)
                cell.status = "ok"
                cell.seconds = time.perf_counter() - t0
                cell.decode_seconds = self.scorer.decode_seconds - d0
                if prune and cell.off_ratio > 1.0 + PRUNE_FACTOR * budget:
                    skip_from[(cell.layer, sign)] = abs(cell.coeff) * (1 + 1e-9)
            self.save()
            if self.on_cell is not None:
                self.on_cell(cell, self.result)

    def check_recommended(self, n_controls: int, seed: int) -> None:
        """Recommend a cell; measure it on the held-out split and ``n_controls`` norm-matched random vectors there."""
        result = self.result
        result.recommended = cell = recommend(result.cells, result.budget, result.on_token_counts)
        if cell is None:
            return
        base = result.base_vector
        split = "holdout" if "holdout" in self.meter.splits else "tune"
        if split == "holdout":
            result.holdout = self.measured(one_layer(base, cell.layer), cell.coeff, split, score=False)
            result.holdout.pop("on_deltas")
        rng = np.random.default_rng(seed)
        for k in range(n_controls):
            control = one_layer(base, cell.layer, rows=norm_matched_random(base.layers[cell.layer], rng))
            numbers = self.measured(control, cell.coeff, split)
            numbers.pop("on_deltas")
            result.controls.append({"seed": seed, "index": k, "split": split, **numbers})

    def finish(self, seconds: float) -> None:
        """Free the meter, record the timing and save, whether the sweep finished or not."""
        if self.meter is not None:
            self.meter.close()
        evaluated = [c for c in self.result.cells if c.status == "ok"]

        def mean(key: str) -> float | None:
            return float(np.mean([getattr(c, key) for c in evaluated])) if evaluated else None

        self.result.timing.update(
            {
                "seconds": seconds,
                "cells_evaluated": len(evaluated),
                "cells_skipped": sum(c.status == "skipped" for c in self.result.cells),
                "seconds_per_cell": mean("seconds"),
                "decode_seconds_per_cell": mean("decode_seconds"),
                "decode_seconds": self.scorer.decode_seconds - self.decode_start,
            }
        )
        self.save()


def one_layer(base: SteeringVector, layer: int, rows: np.ndarray | None = None) -> SteeringVector:
    """``base``'s rows at ``layer`` (or ``rows`` in their place) as a front-aligned one-layer vector."""
    return SteeringVector(
        layers={layer: base.layers[layer] if rows is None else rows},
        fingerprint=base.fingerprint,
        alignment="front",
        anchor=base.anchor,
        anchor_id=base.anchor_id,
    )


def default_anchor(model: str | os.PathLike[str] | None = None) -> str:
    """The anchor ``anchor="auto"`` stands for: the token a document starts after in pretraining.

    * ``"bos"`` when the model adds BOS itself (every text already starts with it);
    * otherwise the end-of-text token, if the vocabulary has one: the separator put between
      pretraining documents (``<|endoftext|>`` for SmolLM2 and GPT-2), so "anchor + sentence"
      reads as the start of a document;
    * otherwise ``"bos"`` if there is one, else ``"none"``.

    Not the BOS of a chat model that adds none: SmolLM2's BOS is ``<|im_start|>``, after
    which the model expects a chat role. With that anchor the second token of every sentence
    is very unlikely, and any vector added at position 1, random ones included, lowers
    perplexity by "fixing" that. After ``<|endoftext|>`` the unsteered perplexity of the same
    sentences is far lower and a random vector raises it, as in the paper.
    """
    from pyactadd.default_model import resolve_model
    from pyactadd.prompts.tokens import Tokenizer

    tokenizer = Tokenizer.from_model(resolve_model(model))
    if tokenizer.adds_bos:
        return "bos"
    vocab = getattr(tokenizer, "vocab", None)
    if vocab is not None:
        lc = llama_cpp_module()
        eot = int(lc.llama_vocab_eot(lc.llama_model_get_vocab(vocab.model)))
        if eot >= 0 and eot != tokenizer.bos_id:
            text = tokenizer.decode([eot])
            if text and tokenizer.encode(text, add_special=False) == [eot]:
                return text
    return "bos" if tokenizer.bos_id is not None else "none"


def sweep_vector(
    positive: str,
    negative: str,
    layers: Sequence[int],
    *,
    model: str | os.PathLike[str] | None = None,
    anchor: str = "auto",
    pad: str = " ",
    zero_outliers: bool = True,
) -> SteeringVector:
    """Extract ``positive - negative`` at every layer in ``layers`` in one forward pass per prompt.

    ``anchor="auto"`` picks :func:`default_anchor` (``<|endoftext|>`` on SmolLM2): both
    prompts start with it, so row 0 is zero and the prompts' content sits away from the
    position-0 attention sink; the same anchor is put before every scored sentence and
    prompt. ``zero_outliers`` zeroes the rows that still sit on a sink (e.g. a lone space
    without an anchor), as :func:`pyactadd.extract` explains.
    """
    from pyactadd.default_model import resolve_model
    from pyactadd.extract.pipeline import extract

    model_path = resolve_model(model)
    if anchor.strip().lower() == "auto":
        anchor = default_anchor(model_path)
    return extract(
        positive,
        negative,
        list(layers),
        model=model_path,
        anchor=anchor,
        pad=pad,
        zero_outliers=zero_outliers,
        progress=True,
    )


def sweep_base(
    model: str | os.PathLike[str],
    *,
    vector_file: str | os.PathLike[str] | None = None,
    positive: str | None = None,
    negative: str | None = None,
    layers: str | None = None,
    anchor: str = "auto",
    pad: str = " ",
    zero_outliers: bool = True,
    on_extract: Callable[[list[int]], None] | None = None,
) -> tuple[SteeringVector, list[int]]:
    """The vector a sweep scales and the layers it sweeps.

    With ``vector_file``: that file (checked against ``model``) and the layers of ``layers``
    (:func:`parse_layers`), or all of the file's. Otherwise :func:`sweep_vector` of
    ``positive - negative`` at the layers of ``layers`` (default: every valid one), after
    ``on_extract(layers)`` is called (to say that a slow extraction starts).

    Raises:
        InputError: a bad layer spec, or neither a file nor a prompt pair.
        ModelMismatchError: the file was made for another model.
    """
    from pyactadd.prompts.tokens import fingerprint_of

    fingerprint = fingerprint_of(model)
    if vector_file is not None:
        base = SteeringVector.load(vector_file)
        base.check_fits(fingerprint)
        return base, parse_layers(layers, fingerprint.n_layer) if layers else base.layer_ids
    if positive is None or negative is None:
        raise InputError("give --positive and --negative, or --vector FILE")
    chosen = parse_layers(layers, fingerprint.n_layer)
    if on_extract is not None:
        on_extract(chosen)
    return sweep_vector(positive, negative, chosen, model=model, anchor=anchor, pad=pad, zero_outliers=zero_outliers), chosen


def sweep_info(
    base: SteeringVector,
    *,
    model: str | os.PathLike[str],
    scored_with: str | os.PathLike[str],
    on_file: str | os.PathLike[str],
    off_file: str | os.PathLike[str],
    vector_file: str | os.PathLike[str] | None = None,
) -> dict:
    """The ``info`` of :func:`run_sweep` that ``pyactadd sweep`` records: model, files and the swept vector."""
    return {
        "model": str(model),
        "scored_with": str(scored_with),
        "compute": "model" if Path(scored_with) == Path(model) else "f32",
        "on_file": str(on_file),
        "off_file": str(off_file),
        "vector": {
            "positive": base.positive,
            "negative": base.negative,
            "file": str(vector_file) if vector_file else None,
            "anchor": base.anchor,
            "anchor_id": base.anchor_id,
            "positive_ids": base.positive_ids,
            "negative_ids": base.negative_ids,
            "n_positions": base.n_positions,
            "zeroed_rows": _zeroed_rows(base),
            "row_norms": {str(layer): [round(float(x), 3) for x in norms] for layer, norms in base.row_norms().items()},
        },
    }


def _zeroed_rows(vector: SteeringVector) -> dict[str, list[int]]:
    """The rows extraction zeroed as attention sinks, by layer (string keys, as JSON writes them)."""
    return {str(layer): rows for layer, rows in vector.zeroed_rows.items()}
