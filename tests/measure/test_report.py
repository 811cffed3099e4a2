"""What ``pyactadd sweep`` prints at the end, built from a sweep's JSON (no model: no anchor to name)."""

from __future__ import annotations

from pyactadd.cli.display import render, table
from pyactadd.measure.report import sweep_summary
from pyactadd.measure.sweep import Cell, SweepResult


def payload(budget: float, recommended: bool) -> dict:
    cells = [
        Cell(4, 0.5, "ok", on_ratio=0.9, off_ratio=1.01, score=0.1),
        Cell(4, 1.0, "ok", on_ratio=0.8, off_ratio=1.3, score=0.2),
        Cell(8, 0.5, "skipped"),
    ]
    result = SweepResult(cells=cells, budget=budget, complete=True)
    result.recommended = cells[0] if recommended else None
    result.timing = {"seconds": 12.0, "cells_skipped": 1}
    return result.as_dict()


def test_summary_names_the_recommended_cell_and_the_best_cells():
    text = render(sweep_summary(payload(0.05, True), scorer=None))
    lines = text.splitlines()
    assert lines[0] == "Swept 2 layers x 2 coefficients: 2 cells evaluated, 1 skipped, in 12 s"
    assert "Recommended: layer 4, coefficient 0.5" in lines
    assert "Best cells within the budget (tuning sentences):" in lines
    assert lines[-1].split() == ["4", "0.5", "0.9000", "1.0100", "+0.100"]  # the one cell within +5 %


def test_summary_without_a_recommendation_suggests_smaller_coefficients():
    text = render(sweep_summary(payload(0.0, False), scorer=None))
    assert "No cell lowers on-target perplexity while keeping off-target perplexity within +0%." in text
    assert "--coeffs 0.125,0.25" in text  # a quarter and a half of the smallest coefficient swept


def test_table_aligns_columns():
    assert table([("name", "n"), ("a", "10"), ("bb", "2")], right={1}) == ["name   n", "----  --", "a     10", "bb     2"]
