"""``pyactadd eval --task ...`` end to end on the real default model: batched generation, scoring,
disfluency in llama.cpp, the statistics, the CLI and the dose-response figure (small N)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.measure.behaviour import (
    PROMPTED,
    STEERED,
    UNSTEERED,
    Arm,
    completion_perplexities,
    evaluate_behaviour,
    measure_arms,
    prompted_opening,
    prompted_prefix,
    seeds_for,
)
from pyactadd.measure.evaluation import shipped_text
from pyactadd.measure.perplexity import BatchScorer
from pyactadd.measure.scoring import make_task
from pyactadd.measure.sweep import norm_matched_random, one_layer
from pyactadd.prompts.files import read_sentences
from pyactadd.runtime.generate import Sampling, load_llama, prompt_tokens

N_OPENINGS, N_PER, TOKENS = 8, 2, 16
WEDDING_LAYER, WEDDING_COEFF = 16, 4.0  # measured: about 0.7 of completions name a wedding word there, none unsteered
SAMPLING = Sampling(max_tokens=TOKENS, temperature=0.7, seed=0)


@pytest.fixture(scope="module")
def llama(default_model_path):
    return load_llama(default_model_path, n_threads=2)


@pytest.fixture(scope="module")
def scorer(default_model_path):
    scorer = BatchScorer(default_model_path, n_threads=2)
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def neutral():
    return read_sentences(shipped_text("neutral_openings.txt"))[:N_OPENINGS]


@pytest.fixture(scope="module")
def weddings(torch_model):
    from pyactadd.extract.pipeline import extract

    return extract(" weddings", " ", [WEDDING_LAYER], anchor="<|endoftext|>")


@pytest.fixture(scope="module")
def topic_run(llama, scorer, neutral, weddings):
    """Unsteered, prompted, steered and one norm-matched random control at the same coefficient, 8 x 2 each."""
    rng = np.random.default_rng(0)
    control = one_layer(weddings, WEDDING_LAYER, rows=norm_matched_random(weddings.layers[WEDDING_LAYER], rng))
    extra = [Arm("random control", WEDDING_COEFF, ((control, WEDDING_COEFF),))]
    return evaluate_behaviour(
        llama, scorer, neutral, [(weddings, 1.0)], make_task("topic"), coeffs=[WEDDING_COEFF], n=N_PER, sampling=SAMPLING,
        parallel=8, extra=extra,
    )


def test_completion_perplexity_equals_the_scorers_own_nll(scorer):
    prompt = scorer.tokenize("I went up to my friend and said")
    completions = [scorer.tokenize(" hello, how are you today?", add_bos=False), [], scorer.tokenize(" the sky", add_bos=False)]
    got = completion_perplexities(scorer, [prompt] * 3, completions)
    assert math.isnan(got[1])
    for k in (0, 2):
        sequence = prompt + completions[k]
        plan = scorer.plan([sequence])
        try:
            nll = scorer.token_nlls(plan, [sequence])[0][-len(completions[k]):]
        finally:
            plan.close()
        assert got[k] == pytest.approx(math.exp(float(np.mean(nll))), rel=1e-4)
    assert got[0] < got[2] * 50  # a fluent greeting is not absurdly unlikely


def test_prompted_text_is_the_positive_prompt(weddings):
    assert prompted_prefix([(weddings, 1.0)]) == "weddings"
    assert prompted_prefix([(weddings, 1.0)], " marriage ") == "marriage"
    assert prompted_opening("weddings", "I went up") == "weddings I went up"
    assert seeds_for(2, 3, 10) == [10, 11, 12, 13, 14, 15]


def test_strong_vector_moves_success_and_random_control_does_not(topic_run):
    summaries = {(s["condition"], s["coeff"]): s for s in topic_run.summaries()}
    unsteered, steered = summaries[(UNSTEERED, None)], summaries[(STEERED, WEDDING_COEFF)]
    control = summaries[("random control", WEDDING_COEFF)]
    assert steered["n"] == unsteered["n"] == N_OPENINGS * N_PER
    assert steered["success"]["value"] >= unsteered["success"]["value"] + 0.4, [c.texts for c in topic_run.conditions]
    assert steered["p_vs_unsteered"] < 0.01
    assert control["p_vs_unsteered"] > 0.05, topic_run.condition("random control").texts
    for s in summaries.values():
        assert s["success"]["low"] <= s["success"]["value"] <= s["success"]["high"]
        assert s["disfluency"]["n"] > 0 and s["disfluency"]["mean"]["value"] > 1.0


def test_unsteered_disfluency_read_while_generating_agrees_with_a_scoring_pass(llama, scorer, topic_run):
    # Measured over 200 completions of 32 tokens against this (Q4_1) scorer: mean ratio 0.999, each within 0.97-1.03.
    sources = {c.name: c.disfluency_source for c in topic_run.conditions}
    assert sources == {UNSTEERED: "generation", PROMPTED: "scoring", STEERED: "scoring", "random control": "scoring"}
    unsteered = topic_run.condition(UNSTEERED)
    ids = [prompt_tokens(llama, o, anchor_id=topic_run.anchor_id) for o in topic_run.openings]
    scored = completion_perplexities(scorer, [i for i in ids for _ in range(N_PER)], unsteered.tokens)
    finite = np.isfinite(scored)
    assert finite.sum() > N_OPENINGS and np.array_equal(finite, np.isfinite(unsteered.disfluency))
    ratio = unsteered.disfluency[finite] / scored[finite]
    assert np.all(np.abs(ratio - 1) < 0.1) and abs(ratio.mean() - 1) < 0.02
    assert abs(np.log(topic_run.condition(STEERED).disfluency[finite] / scored[finite]).mean()) > 0.05  # other tokens, other numbers


def test_sentiment_end_to_end_love_turns_negative_openings_positive(tmp_path):
    # Measured on 12 openings x 2: unsteered 0.125, Love - Hate at layer 6 x 8: 0.958 (p < 0.001).
    from pyactadd.extract.pipeline import extract

    love = tmp_path / "love.gguf"
    extract("Love", "Hate", [6]).save(love)
    args = ["eval", "--steer", f"{love}:8", "--task", "sentiment", "--limit", "8", "--n", "2", "--max-tokens", "16", "--threads", "2", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert "VADER" in payload["scorer"] and payload["prompted_text"] == "Love"
    summaries = {c["condition"]: c for c in payload["conditions"]}
    assert summaries[STEERED]["success"]["value"] >= summaries[UNSTEERED]["success"]["value"] + 0.4, payload["completions"]
    assert summaries[STEERED]["p_vs_unsteered"] < 0.01
    assert summaries[UNSTEERED]["disfluency"]["source"] == "generation" and summaries[STEERED]["disfluency"]["source"] == "scoring"


def test_identical_seeds_give_identical_completions(llama, scorer, neutral, weddings):
    arms = [Arm(UNSTEERED), Arm(STEERED, WEDDING_COEFF, ((weddings, WEDDING_COEFF),))]
    runs = [
        measure_arms(llama, scorer, neutral[:1], arms, make_task("topic"), anchor_id=weddings.anchor_id, prefix="weddings",
                     n=N_PER, sampling=SAMPLING, parallel=4)
        for _ in range(2)
    ]
    for first, second in zip(runs[0].conditions, runs[1].conditions):
        assert first.texts == second.texts and first.tokens == second.tokens, first.name
        np.testing.assert_allclose(first.disfluency, second.disfluency, rtol=1e-6)
    assert len(set(runs[0].conditions[0].texts)) > 1  # the seeds differ between completions


def test_cli_json_table_and_dose_response_figure(weddings, neutral, tmp_path):
    vector_file, prompts, png = tmp_path / "w.gguf", tmp_path / "p.txt", tmp_path / "dose.png"
    weddings.save(vector_file)
    prompts.write_text("\n".join(neutral[:2]) + "\n", encoding="utf-8")
    args = ["eval", "--steer", str(vector_file), "--task", "topic", "--prompts", str(prompts), "--n", "2", "--max-tokens", "6",
            "--coeffs", "2,4", "--threads", "2"]
    result = CliRunner().invoke(main, args + ["--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [(c["condition"], c["coeff"]) for c in payload["conditions"]] == [(UNSTEERED, None), (PROMPTED, None), (STEERED, 2.0), (STEERED, 4.0)]
    assert payload["n_openings"] == 2 and all(c["n"] == 4 for c in payload["conditions"])
    assert payload["prompted_text"] == "weddings" and len(payload["completions"][0]["items"]) == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = CliRunner().invoke(main, args + ["--limit", "1", "--n", "1", "--coeffs", "4"])
    assert table.exit_code == 0, table.output
    assert "p vs unsteered" in table.stdout and "steered x4" in table.stdout and "whole word" in table.stdout
