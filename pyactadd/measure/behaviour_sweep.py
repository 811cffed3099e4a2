"""``pyactadd sweep --objective behaviour``: choose a layer and a coefficient by what generated text does.

Every cell ``(L, c)`` of the grid generates completions of the *tuning* openings (the
even-numbered lines: 1st, 3rd, ...) with ``base``'s layer-``L`` rows times ``c`` in force and
scores them (:mod:`pyactadd.measure.behaviour`). The chosen cell has the highest success
rate among the cells whose mean disfluency stays within ``max_disfluency`` times the
unsteered mean on the same openings; ties go to the lower disfluency, then the smaller
coefficient, then the lower layer. It is then checked on the *held-out* openings (the
odd-numbered lines, never seen by the choice): unsteered, prompted, the chosen cell and
``n_controls`` norm-matched random vectors at the same cell (the same per-position row
norms, random directions), all with the same seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.measure.behaviour import UNSTEERED, Arm, BehaviourResult, measure_arms
from pyactadd.measure.perplexity import BatchScorer
from pyactadd.measure.scoring import Task
from pyactadd.measure.sweep import norm_matched_random, one_layer, split_sentences
from pyactadd.runtime.generate import Sampling
from pyactadd.vector.value import SteeringVector

DEFAULT_MAX_DISFLUENCY = 1.5
"""Largest allowed ratio of mean disfluency, steered / unsteered (the paper's ActAdd row is 29.2 / 17.2 = 1.7)."""

CONTROL = "random control"


@dataclass(frozen=True)
class BehaviourCell:
    """One grid cell's numbers on the tuning openings."""

    layer: int
    coeff: float
    success: float
    disfluency: float  # mean perplexity of the completions under the unsteered model
    disfluency_ratio: float  # disfluency / the unsteered disfluency

    def within(self, max_disfluency: float) -> bool:
        return math.isfinite(self.disfluency_ratio) and self.disfluency_ratio <= max_disfluency

    def as_dict(self, max_disfluency: float) -> dict:
        return {**self.__dict__, "within_budget": self.within(max_disfluency)}


def choose_cell(cells: Sequence[BehaviourCell], max_disfluency: float) -> BehaviourCell | None:
    """The highest success rate within the disfluency budget (ties: lower disfluency, smaller |coeff|, lower layer)."""
    within = [c for c in cells if c.within(max_disfluency)]
    if not within:
        return None
    return min(within, key=lambda c: (-c.success, c.disfluency, abs(c.coeff), c.layer))


def mean_disfluency(values: np.ndarray) -> float:
    """Mean of the finite disfluencies (NaN when there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def run_behaviour_sweep(
    llama,
    scorer: BatchScorer,
    base: SteeringVector,
    openings: Sequence[str],
    task: Task,
    *,
    layers: Sequence[int],
    coeffs: Sequence[float],
    prefix: str,
    max_disfluency: float = DEFAULT_MAX_DISFLUENCY,
    n: int = 2,
    sampling: Sampling = Sampling(max_tokens=32),
    parallel: int = 16,
    n_controls: int = 3,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Sweep ``layers`` x ``coeffs`` by success rate under a disfluency budget; check the choice on held-out openings.

    Returns:
        ``{"objective", "task", "scorer", "max_disfluency", "split", "tune_unsteered", "cells",
        "chosen", "holdout", "timing"}``; ``holdout`` is
        :meth:`~pyactadd.measure.behaviour.BehaviourResult.as_dict` (without the completions) of
        the held-out check, None when no cell is within the budget.

    Raises:
        InputError: fewer than 2 openings, a layer ``base`` lacks, a budget below 1.
    """
    started = time.perf_counter()
    tune, held = split_sentences(openings, True)
    if not held:
        raise InputError("choosing on half the openings and checking on the other half needs at least 2 openings")
    missing = [layer for layer in layers if layer not in base.layers]
    if missing:
        raise InputError(f"the vector has no rows for layers {missing}: it has layers {base.layer_ids}")
    if not max_disfluency >= 1:
        raise InputError(f"--max-disfluency is a ratio to the unsteered disfluency, at least 1; got {max_disfluency}")
    common = dict(anchor_id=base.anchor_id, prefix=prefix, n=n, sampling=sampling, parallel=parallel, align="front", progress=progress)
    grid = [(layer, coeff) for layer in layers for coeff in coeffs]
    arms = [Arm(UNSTEERED)] + [Arm(f"L{layer}", coeff, ((one_layer(base, layer), coeff),)) for layer, coeff in grid]
    tuned = measure_arms(llama, scorer, tune, arms, task, **common)
    cells = _cells(grid, tuned)
    chosen = choose_cell(cells, max_disfluency)
    holdout = None
    if chosen is not None:
        holdout = _check(llama, scorer, base, held, task, chosen, n_controls, seed, common).as_dict(completions=False)
    baseline = tuned.conditions[0]
    return {
        "objective": "behaviour",
        "task": task.name,
        "scorer": task.description,
        "max_disfluency": max_disfluency,
        "split": {"choose_on": "even-numbered lines (1st, 3rd, ...)", "held_out": "odd-numbered lines (2nd, 4th, ...)",
                  "n_tune": len(tune), "n_holdout": len(held), "n_per_opening": n},
        "tune_unsteered": {"success": float(baseline.success.mean()), "disfluency": mean_disfluency(baseline.disfluency)},
        "cells": [c.as_dict(max_disfluency) for c in cells],
        "chosen": None if chosen is None else chosen.as_dict(max_disfluency),
        "holdout": holdout,
        "timing": {"seconds": time.perf_counter() - started},
    }


def _cells(grid: list[tuple[int, float]], tuned: BehaviourResult) -> list[BehaviourCell]:
    """Each grid cell's success and disfluency from the tuning run (its first condition is unsteered)."""
    base_disfluency = mean_disfluency(tuned.conditions[0].disfluency)
    cells = []
    for (layer, coeff), condition in zip(grid, tuned.conditions[1:]):
        disfluency = mean_disfluency(condition.disfluency)
        cells.append(BehaviourCell(layer, coeff, float(condition.success.mean()), disfluency, disfluency / base_disfluency))
    return cells


def _check(llama, scorer, base: SteeringVector, held: list[str], task: Task, cell: BehaviourCell, n_controls: int, seed: int, common: dict) -> BehaviourResult:
    """The chosen cell on the held-out openings beside unsteered, prompted and norm-matched random controls."""
    from pyactadd.measure.behaviour import PROMPTED, STEERED

    rng = np.random.default_rng(seed)
    rows = base.layers[cell.layer]
    arms = [Arm(UNSTEERED), Arm(PROMPTED, prompted=True), Arm(STEERED, cell.coeff, ((one_layer(base, cell.layer), cell.coeff),))]
    for _ in range(n_controls):
        control = one_layer(base, cell.layer, rows=norm_matched_random(rows, rng))
        arms.append(Arm(CONTROL, cell.coeff, ((control, cell.coeff),)))
    return measure_arms(llama, scorer, held, arms, task, **common)


def chosen_vector(base: SteeringVector, layer: int, coeff: float) -> SteeringVector:
    """``base``'s rows at ``layer`` times ``coeff``, keeping its prompts and anchor (what ``sweep --write`` saves)."""
    import dataclasses

    zeroed = {layer: base.zeroed_rows[layer]} if layer in base.zeroed_rows else {}
    return dataclasses.replace(base, layers={layer: base.layers[layer]}, zeroed_rows=zeroed) * coeff
