"""``pyactadd eval --task ...`` and ``sweep --objective behaviour`` on bad input: one ``Error:`` line, exit 2,
no traceback, and nothing loaded or written (real CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.vector.value import ModelFingerprint, SteeringVector

SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-cli") / "v.gguf"
    SteeringVector(layers={6: np.full((2, 576), 0.01, dtype=np.float32)}, fingerprint=SMOL, positive="Love", negative="Hate").save(path)
    return path


@pytest.fixture(scope="module")
def bare_vector_file(tmp_path_factory):
    """A file that keeps no prompt text (as a converted foreign file)."""
    path = tmp_path_factory.mktemp("eval-cli") / "bare.gguf"
    SteeringVector(layers={6: np.full((2, 576), 0.01, dtype=np.float32)}, fingerprint=SMOL).save(path)
    return path


def one_error(args, *needles: str, code: int = 2) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_unknown_task(vector_file):
    one_error(["eval", "--steer", vector_file, "--task", "toxicity"], "--task", "toxicity")


def test_empty_and_malformed_prompt_files(vector_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n", encoding="utf-8")
    one_error(["eval", "--steer", vector_file, "--task", "sentiment", "--prompts", empty], "--prompts", "is empty")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"I hate\n\xff\xfe broken\n")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--prompts", binary], "--prompts", "not UTF-8", "line 2")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--prompts", tmp_path / "missing.txt"], "--prompts", "no such")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--prompts", tmp_path], "--prompts")


def test_classifier_directory_that_is_not_one(vector_file, tmp_path):
    one_error(["eval", "--steer", vector_file, "--task", "sentiment", "--classifier", tmp_path], "--classifier", "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}), encoding="utf-8")
    one_error(["eval", "--steer", vector_file, "--task", "sentiment", "--classifier", tmp_path], "--classifier", "'pos' and 'neg'")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "NEGATIVE", "1": "POSITIVE"}}), encoding="utf-8")
    one_error(["eval", "--steer", vector_file, "--task", "sentiment", "--classifier", tmp_path], "--classifier", "cannot load")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--classifier", tmp_path], "--task sentiment only")


def test_words_task_needs_targets_and_options_must_fit_the_task(vector_file, bare_vector_file):
    one_error(["eval", "--steer", vector_file, "--task", "words"], "--targets")
    one_error(["eval", "--steer", vector_file, "--task", "words", "--targets", " , "], "--targets", "no target words")
    one_error(["eval", "--steer", vector_file, "--n", "4"], "--n", "--task perplexity")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--on", vector_file], "--on", "--task topic")
    one_error(["eval", "--steer", bare_vector_file, "--task", "topic"], "--prompted-text")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--plot", "dose.pdf"], "--plot", ".png")
    one_error(["eval", "--steer", vector_file, "--task", "topic", "--coeffs", "1,x"], "--coeffs")


def test_sweep_behaviour_options_must_fit_the_objective(vector_file, tmp_path):
    one_error(["sweep", "--vector", vector_file, "--max-disfluency", "2"], "--max-disfluency", "--objective perplexity")
    one_error(["sweep", "--vector", vector_file, "--objective", "behaviour", "--budget", "3"], "--budget", "--objective behaviour")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    one_error(["sweep", "--vector", vector_file, "--objective", "behaviour", "--prompts", empty], "--prompts", "is empty")
    one_error(["sweep", "--vector", vector_file, "--objective", "behaviour", "--max-disfluency", "0.5"], "--max-disfluency")
