"""``sweep --objective behaviour``: the choice rule on fixed cells, and a tiny grid end to end on the default model."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.measure.behaviour_sweep import BehaviourCell, choose_cell, mean_disfluency
from pyactadd.measure.evaluation import shipped_text
from pyactadd.prompts.files import read_sentences
from pyactadd.vector.value import SteeringVector


def test_choose_cell_takes_the_best_success_within_the_budget():
    cells = [
        BehaviourCell(6, 2.0, success=0.30, disfluency=12.0, disfluency_ratio=1.2),
        BehaviourCell(6, 4.0, success=0.70, disfluency=30.0, disfluency_ratio=3.0),  # best success, over budget
        BehaviourCell(8, 2.0, success=0.45, disfluency=14.0, disfluency_ratio=1.4),
        BehaviourCell(10, 1.0, success=0.45, disfluency=13.0, disfluency_ratio=1.3),  # tie on success: less disfluent
        BehaviourCell(12, 1.0, success=0.90, disfluency=math.nan, disfluency_ratio=math.nan),  # nothing to measure: out
    ]
    chosen = choose_cell(cells, 1.5)
    assert (chosen.layer, chosen.coeff) == (10, 1.0)
    assert choose_cell(cells, 3.0).coeff == 4.0
    assert choose_cell(cells, 1.1) is None
    assert cells[1].as_dict(1.5)["within_budget"] is False


def test_mean_disfluency_skips_empty_completions():
    import numpy as np

    assert mean_disfluency(np.array([2.0, np.nan, 4.0])) == 3.0
    assert math.isnan(mean_disfluency(np.array([np.nan])))


@pytest.fixture(scope="module")
def weddings_file(torch_model, tmp_path_factory):
    from pyactadd.extract.pipeline import extract

    path = tmp_path_factory.mktemp("bsweep") / "weddings.gguf"
    extract(" weddings", " ", [12, 16], anchor="<|endoftext|>").save(path)
    return path


def test_behaviour_sweep_chooses_on_even_lines_and_checks_on_odd_ones(weddings_file, tmp_path):
    prompts = tmp_path / "openings.txt"
    prompts.write_text("\n".join(read_sentences(shipped_text("neutral_openings.txt"))[:4]) + "\n", encoding="utf-8")
    out, written = tmp_path / "sw", tmp_path / "best.gguf"
    result = CliRunner().invoke(main, [
        "sweep", "--vector", str(weddings_file), "--objective", "behaviour", "--task", "topic", "--layers", "16",
        "--coeffs", "2,4", "--prompts", str(prompts), "--n", "2", "--max-tokens", "8", "--controls", "1",
        "--max-disfluency", "1000", "--out", str(out), "--write", str(written), "--json", "--threads", "2",
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload == json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    assert payload["split"]["n_tune"] == 2 and payload["split"]["n_holdout"] == 2
    assert [(c["layer"], c["coeff"]) for c in payload["cells"]] == [(16, 2.0), (16, 4.0)]
    best = max(payload["cells"], key=lambda c: (c["success"], -c["disfluency"]))
    assert (payload["chosen"]["layer"], payload["chosen"]["coeff"]) == (best["layer"], best["coeff"])
    names = [(c["condition"], c["coeff"]) for c in payload["holdout"]["conditions"]]
    assert names == [("unsteered", None), ("prompted", None), ("steered", best["coeff"]), ("random control", best["coeff"])]
    assert all(c["n"] == 4 for c in payload["holdout"]["conditions"])
    vector = SteeringVector.load(written)
    assert vector.layer_ids == [16] and vector.positive == " weddings"
    assert "Held-out openings" in result.stderr
