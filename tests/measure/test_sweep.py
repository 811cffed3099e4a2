"""The layer x coefficient sweep: parsing, the recommendation rule, and a real sweep on the default model.

The real sweep runs a small grid (2 layers x 3 coefficients) on the first 48 lines of each
shipped text set: it chooses on the even lines and the test checks the written vector on
the odd lines with ``evaluate`` in its exact mode (the Q4_1 file as is, sentence by
sentence), i.e. on sentences the sweep never saw and with other arithmetic than the
sweep's float32 copy.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pyactadd.cli import main
from pyactadd.errors import InputError
from pyactadd.measure.evaluation import shipped_text
from pyactadd.prompts.files import read_sentences
from pyactadd.measure.sweep import (
    Cell,
    SweepResult,
    norm_matched_random,
    paired_se,
    parse_budget,
    parse_coeffs,
    parse_layers,
    recommend,
    split_sentences,
)
from pyactadd.vector.value import SteeringVector

N_LINES = 48
LAYERS = [16, 20]
COEFFS = [0.125, 0.25, 0.5]
BUDGET = 0.05


# ---------------------------------------------------------------- parsing (no model)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1-29", list(range(1, 30))),
        ("2,4,8", [2, 4, 8]),
        ("2:29:3", list(range(2, 30, 3))),
        ("8-20:4", [8, 12, 16, 20]),
        ("all", list(range(1, 30))),
        (" 3 , 1-2 ,3", [1, 2, 3]),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 30) == expected


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("0", "out of range"), ("30", "out of range"), ("1-40", "out of range"), ("a-b", "cannot parse"),
     ("5-2", "empty range"), ("1-29:0", "empty range"), ("", "cannot parse"), ("1,,2", "cannot parse")],
)
def test_parse_layers_errors(spec, needle):
    with pytest.raises(InputError, match=needle):
        parse_layers(spec, 30)


def test_parse_coeffs():
    assert parse_coeffs("0.5,1,2") == [0.5, 1.0, 2.0]
    assert parse_coeffs("0.5:2:0.5") == [0.5, 1.0, 1.5, 2.0]
    assert parse_coeffs("-2,1, 4") == [-2.0, 1.0, 4.0]
    assert parse_coeffs(None) == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("text", ["1,,2", "x", "1:2", "nan", "inf", "0", "2:1:0.5", "1:2:-1", ""])
def test_parse_coeffs_errors(text):
    with pytest.raises(InputError, match="coefficient"):
        parse_coeffs(text)


def test_parse_budget():
    assert parse_budget("5") == pytest.approx(0.05)
    assert parse_budget("2.5%") == pytest.approx(0.025)
    for bad in ("-1", "abc", "nan"):
        with pytest.raises(InputError, match="budget"):
            parse_budget(bad)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 29), min_size=1, max_size=10))
def test_parse_layers_accepts_any_list(layers):
    assert parse_layers(",".join(map(str, layers)), 30) == sorted(set(layers))


def test_recommend_takes_the_largest_gain_within_budget():
    cells = [
        Cell(4, 1.0, "ok", on_ratio=0.70, off_ratio=1.20),  # best gain but over budget
        Cell(8, 1.0, "ok", on_ratio=0.85, off_ratio=1.04),
        Cell(8, 2.0, "ok", on_ratio=0.80, off_ratio=1.05),  # exactly at the budget: allowed
        Cell(12, 1.0, "ok", on_ratio=1.02, off_ratio=0.90),  # no gain
        Cell(12, 2.0, "skipped"),
    ]
    best = recommend(cells, 0.05)
    assert (best.layer, best.coeff) == (8, 2.0)
    assert recommend(cells, 0.0) is None
    assert recommend([Cell(1, 1.0, "ok", on_ratio=1.1, off_ratio=1.0)], 0.05) is None


def test_recommend_breaks_statistical_ties_by_off_target_ratio():
    """Gains within one paired standard error of the best are ties: the smaller off-target rise wins."""
    rng = np.random.default_rng(0)
    counts = np.full(30, 14.0)
    common = rng.normal(-1.0, 1.0, 30)  # both cells lower the same sentences by about as much
    cells = [
        Cell(13, 0.25, "ok", on_ratio=0.928, off_ratio=1.038, on_deltas=common - 0.02),
        Cell(20, 0.25, "ok", on_ratio=0.929, off_ratio=0.998, on_deltas=common + rng.normal(0, 0.5, 30)),
        Cell(22, 0.25, "ok", on_ratio=0.990, off_ratio=0.980, on_deltas=common + 0.8 + rng.normal(0, 0.05, 30)),
    ]
    assert recommend(cells, 0.05, counts).layer == 20  # 13 and 20 are tied; 22's smaller gain is real
    assert recommend(cells, 0.05).layer == 13  # without per-sentence data: the largest gain, literally


def test_paired_se_of_a_ratio_estimator():
    counts = np.array([10.0, 10.0, 10.0, 10.0])
    assert paired_se(np.array([-1.0, -1.0, -1.0, -1.0]), counts) == pytest.approx(0.0)
    assert paired_se(np.array([-2.0, 0.0, -2.0, 0.0]), counts) == pytest.approx(math.sqrt(4 / 3 * 4) / 40)


def test_norm_matched_random_keeps_row_norms():
    rng = np.random.default_rng(0)
    rows = np.zeros((3, 576), dtype=np.float32)
    rows[1] = rng.standard_normal(576) * 5
    rows[2] = rng.standard_normal(576) * 50
    control = norm_matched_random(rows, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(control, axis=1), np.linalg.norm(rows, axis=1), rtol=1e-5)
    assert not control[0].any()
    cosine = control[2] @ rows[2] / (np.linalg.norm(control[2]) * np.linalg.norm(rows[2]))
    assert abs(cosine) < 0.2  # random directions in 576 dimensions are nearly orthogonal


def test_split_sentences_is_even_and_odd_lines():
    assert split_sentences(list("abcde"), True) == (["a", "c", "e"], ["b", "d"])
    assert split_sentences(list("ab"), False) == (["a", "b"], [])


def test_partial_result_files_are_valid(tmp_path):
    cells = [Cell(3, 1.0, "ok", on_ratio=0.9, off_ratio=1.01, score=0.1, on_ppl=9.0, off_ppl=10.1), Cell(3, 2.0)]
    result = SweepResult(cells=cells, budget=0.05, info={"layers": [3]})
    result.write(tmp_path)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["complete"] is False
    assert data["recommended"]["layer"] == 3 and data["recommended"]["final"] is False
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "pending"]
    assert not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    on = read_sentences(shipped_text("weddings.txt"))[:N_LINES]
    off = read_sentences(shipped_text("shipping.txt"))[:N_LINES]
    folder = tmp_path_factory.mktemp("texts")
    (folder / "on.txt").write_text("\n".join(on) + "\n", encoding="utf-8")
    (folder / "off.txt").write_text("\n".join(off) + "\n", encoding="utf-8")
    return {"on": on, "off": off, "on_file": folder / "on.txt", "off_file": folder / "off.txt"}


@pytest.fixture(scope="module")
def scorer(default_model_path):
    from pyactadd.measure.perplexity import BatchScorer, scoring_model

    return BatchScorer(scoring_model(default_model_path, "auto"))


@pytest.fixture(scope="module")
def weddings(torch_model):
    from pyactadd.measure.sweep import sweep_vector

    return sweep_vector(" weddings", " ", LAYERS)


@pytest.fixture(scope="module")
def swept(weddings, texts, scorer, tmp_path_factory):
    from pyactadd.measure.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    result = run_sweep(
        weddings, texts["on"], texts["off"], scorer=scorer, coeffs=COEFFS, budget=BUDGET, n_controls=2, out_dir=out
    )
    return result, out


def test_extraction_for_the_sweep_is_anchored(weddings):
    assert weddings.anchor_id == 0  # <|endoftext|>: SmolLM2 adds no BOS; documents start after this token
    for layer in LAYERS:
        norms = np.linalg.norm(weddings.layers[layer], axis=1)
        assert norms[0] == 0  # both prompts share the anchor: no row on the position-0 sink
        assert 50 < norms[1] < 1000  # " weddings" vs " " after the anchor: an ordinary row, not a sink


def test_recommended_cell_lowers_on_target_perplexity_on_held_out_sentences(swept, texts, tmp_path, default_model_path):
    from pyactadd.measure.evaluation import evaluate

    result, _ = swept
    assert result.complete
    cell = result.recommended
    assert cell is not None, [c.as_dict(BUDGET) for c in result.cells]
    assert cell.on_ratio < 1 and cell.off_ratio <= 1 + BUDGET
    # The sweep's own held-out check (odd lines, float32 copy).
    assert result.holdout["on_ratio"] < 1
    assert result.holdout["off_ratio"] <= 1 + BUDGET

    # The written vector, checked independently: exact llama.cpp arithmetic on the Q4_1 file.
    path = tmp_path / "best.gguf"
    result.recommended_vector().save(path)
    vector = SteeringVector.load(path)
    assert vector.layer_ids == [cell.layer] and vector.coefficient == pytest.approx(cell.coeff)
    held_on, held_off = texts["on"][1::2], texts["off"][1::2]
    check = evaluate([(vector, 1.0)], held_on, held_off, model=default_model_path, prompt=None)
    assert check["on"]["ratio"] < 1, check
    assert check["off"]["ratio"] <= 1 + BUDGET, check


def test_random_control_moves_on_target_perplexity_much_less(swept):
    """Norm-matched random rows at the recommended cell do not make wedding sentences likelier.

    Compared as gains (-log ratio, on the held-out sentences): the real vector's is
    positive; every control's is below half of it (measured: controls raise perplexity).
    """
    result, _ = swept
    real = -math.log(result.holdout["on_ratio"])
    controls = [-math.log(c["on_ratio"]) for c in result.controls]
    assert len(controls) == 2 and all(c["split"] == "holdout" for c in result.controls)
    assert real > 0
    assert max(controls) < 0.5 * real, (result.holdout, result.controls)
    # The real vector raises the wedding words after neutral prompts; random directions do not.
    recommended_score = result.recommended.score
    assert recommended_score > 0
    assert np.mean([c["score"] for c in result.controls]) < 0.5 * recommended_score


def test_sweep_files(swept):
    from pyactadd.measure.plots import plot_sweep

    result, out = swept
    data = json.loads((out / "sweep.json").read_text())
    assert data["complete"] is True
    assert data["recommended"]["layer"] == result.recommended.layer
    assert {"on_ratio", "off_ratio"} <= set(data["recommended"]["holdout"])
    assert data["control"]["n"] == 2
    assert len(data["cells"]) == len(LAYERS) * len(COEFFS)
    assert data["split"]["n_on_tune"] == N_LINES // 2
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == len(LAYERS) * len(COEFFS)
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    png = plot_sweep(data, out / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_leaves_a_valid_partial_result(weddings, texts, scorer, tmp_path):
    from pyactadd.measure.sweep import run_sweep

    def interrupt(cell, result):
        if sum(c.status == "ok" for c in result.cells) == 1:
            raise KeyboardInterrupt

    result = run_sweep(
        weddings, texts["on"][:8], texts["off"][:8], scorer=scorer, layers=[16], coeffs=[1, 2],
        n_controls=0, out_dir=tmp_path, on_cell=interrupt,
    )
    assert not result.complete
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["complete"] is False
    assert [c["status"] for c in data["cells"]] == ["ok", "pending"]
    assert len(list(csv.DictReader((tmp_path / "sweep.csv").open()))) == 2
    assert not scorer.steering.applied  # steering cleared after the interruption


# ---------------------------------------------------------------- the CLI


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in result.output.lower(), result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--coeffs", "1,,2"], "cannot parse coefficients"),
        (["--coeffs", "one"], "not a number"),
        (["--layers", "x-y"], "cannot parse layers"),
        (["--layers", "1-40"], "out of range"),
        (["--budget", "-3"], "budget"),
        (["--write", "out.txt"], ".gguf"),
    ],
)
def test_sweep_bad_options(args, needle, tmp_path):
    result = invoke("sweep", "-p", " weddings", "-n", " ", "--out", str(tmp_path), *args)
    assert_clean_error(result, needle)


def test_sweep_needs_a_pair_or_a_file(tmp_path):
    assert_clean_error(invoke("sweep", "-p", " weddings", "--out", str(tmp_path)), "--negative")
    assert_clean_error(invoke("sweep", "-p", "a", "-n", "b", "--vector", "x.gguf"), "not both")


def test_sweep_rejects_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Le café était fermé.\n".encode("latin-1"))
    assert_clean_error(invoke("sweep", "-p", "a", "-n", "b", "--on", str(empty)), "is empty")
    assert_clean_error(invoke("sweep", "-p", "a", "-n", "b", "--off", str(latin)), "not UTF-8")


def test_sweep_cli_interrupted_exits_130(monkeypatch, texts, tmp_path):
    """Ctrl-C in the middle of the grid: exit 130, a partial JSON, the best cell so far on the terminal."""
    from pyactadd.measure import sweep as sweep_module

    calls = {"n": 0}
    real = sweep_module.Meter.measure

    def measure(self, split="tune", *, score=True):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, split, score=score)

    monkeypatch.setattr(sweep_module.Meter, "measure", measure)
    small_on, small_off = tmp_path / "on.txt", tmp_path / "off.txt"
    small_on.write_text("\n".join(texts["on"][:6]), encoding="utf-8")
    small_off.write_text("\n".join(texts["off"][:6]), encoding="utf-8")
    out = tmp_path / "sw"
    result = invoke(
        "sweep", "-p", " weddings", "-n", " ", "--layers", "16", "--coeffs", "0.125,0.25", "--on", str(small_on),
        "--off", str(small_off), "--out", str(out), "--controls", "0", "--no-prune",
    )
    assert result.exit_code == 130, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["complete"] is False
    assert [c["status"] for c in data["cells"]] == ["ok", "pending"]
    assert "Interrupted" in result.output
    assert "Best so far" in result.output or "No cell" in result.output
