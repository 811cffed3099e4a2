"""The real CLI, driven with click's CliRunner on the real default model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.vector.value import ModelFingerprint, SteeringVector

SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def love_file(workdir) -> Path:
    out = workdir / "love.gguf"
    result = CliRunner().invoke(main, ["extract", "-p", "Love", "-n", "Hate", "-l", "6", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_error(result, *needles: str) -> None:
    """Non-zero exit, a one-line message, no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.output.strip()
    assert "Traceback" not in text
    error_lines = [line for line in text.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, text
    for needle in needles:
        assert needle.lower() in text.lower(), text


def test_extract_then_run_json_compare(love_file):
    result = invoke("run", "I hate you because", "--steer", f"{love_file}:5", "--compare", "--json", "--max-tokens", "12")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["completions"]) == {"unsteered", "steered"}
    assert payload["completions"]["unsteered"] != payload["completions"]["steered"]
    assert payload["steering"][0]["layers"] == [6]
    assert payload["settings"]["seed"] == 0


def test_run_compare_prints_side_by_side(love_file):
    result = invoke("run", "I hate you because", "--steer", f"{love_file}:5", "--compare", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "steered (" in result.output and " | " in result.output


def test_run_prompts_file_equals_one_run_per_prompt(workdir, love_file):
    prompts = ["I hate you because", "The weather today is", "My neighbour is"]
    (workdir / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    common = ["--steer", f"{love_file}:5", "--compare", "--json", "--max-tokens", "10", "--temperature", "0"]
    # One sequence per decode is one-at-a-time decoding: the same text as `run`, exactly.
    one = invoke("run", "--prompts", str(workdir / "prompts.txt"), "--parallel", "1", *common)
    assert one.exit_code == 0, one.output
    for prompt, payload in zip(prompts, json.loads(one.stdout)):
        alone = json.loads(invoke("run", prompt, *common).stdout)
        assert payload["prompt"] == prompt
        assert payload["completions"] == alone["completions"]
        assert payload["prompt_tokens"] == alone["prompt_tokens"]
    # Batched: the same shape; texts may part where llama.cpp's batched numerics tip a near-tie.
    many = invoke("run", "--prompts", str(workdir / "prompts.txt"), "--parallel", "6", *common)
    assert many.exit_code == 0, many.output
    payloads = json.loads(many.stdout)
    assert [p["prompt"] for p in payloads] == prompts
    assert all(p["completions"]["steered"] != p["completions"]["unsteered"] for p in payloads)
    assert payloads[0]["settings"]["parallel"] == 6


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompts", "missing.txt"], "--prompts"),
        (["I hate you", "--prompts", "PROMPTS"], "not both"),
        ([], "Missing argument 'PROMPT' (or --prompts FILE)"),
        (["--prompts", "EMPTY"], "--prompts"),
    ],
)
def test_run_prompts_refusals(workdir, love_file, args, needle):
    (workdir / "empty.txt").write_text("\n\n", encoding="utf-8")
    (workdir / "p.txt").write_text("Hello\n", encoding="utf-8")
    args = [{"PROMPTS": str(workdir / "p.txt"), "EMPTY": str(workdir / "empty.txt")}.get(a, a) for a in args]
    assert_clean_error(invoke("run", *args, "--steer", str(love_file)), needle)


@pytest.mark.parametrize("layer", ["0", "30", "-1"])
def test_extract_rejects_bad_layer(workdir, layer):
    out = workdir / f"bad-layer{layer}.gguf"
    assert_clean_error(invoke("extract", "-p", "Love", "-n", "Hate", "-l", layer, "-o", str(out)), "layer")
    assert not out.exists()


def test_extract_rejects_empty_prompt(workdir):
    out = workdir / "empty.gguf"
    assert_clean_error(invoke("extract", "-p", "", "-n", "Hate", "-l", "6", "-o", str(out)), "empty")
    assert not out.exists()


def test_run_rejects_empty_prompt(love_file):
    assert_clean_error(invoke("run", "", "--steer", str(love_file)), "empty")


def test_missing_steering_file(workdir):
    assert_clean_error(invoke("run", "Hello", "--steer", str(workdir / "nope.gguf")), "nope.gguf")


def test_missing_model_file(workdir):
    assert_clean_error(invoke("run", "Hello", "--model", str(workdir / "nomodel.gguf")), "nomodel.gguf")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_steering_file(workdir, love_file, damage):
    bad = workdir / f"{damage}.gguf"
    data = love_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"GGUF" + bytes(range(256)) * 8)
    assert_clean_error(invoke("run", "Hello", "--steer", str(bad)), bad.name)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_in_file(workdir, value):
    import gguf

    path = workdir / f"nonfinite-{value}.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 1)
    rows = np.ones(576, dtype=np.float32)
    rows[7] = value
    writer.add_tensor("direction.5", rows)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_error(invoke("run", "Hello", "--steer", str(path)), path.name)


@pytest.mark.parametrize(
    "fingerprint",
    [
        ModelFingerprint(architecture="llama", n_embd=640, n_layer=18, n_vocab=262144),
        ModelFingerprint(architecture="llama", n_embd=576, n_layer=24, n_vocab=49152),
    ],
    ids=["n_embd", "n_layer"],
)
def test_vector_for_another_model(workdir, fingerprint):
    rows = np.ones((2, fingerprint.n_embd), dtype=np.float32)
    path = workdir / f"other-{fingerprint.n_embd}-{fingerprint.n_layer}.gguf"
    SteeringVector(layers={6: rows}, fingerprint=fingerprint).save(path)
    assert_clean_error(invoke("run", "Hello", "--steer", str(path)), "model")


def test_steered_span_must_fit_context(workdir):
    rows = np.ones((300, 576), dtype=np.float32)
    path = workdir / "long.gguf"
    SteeringVector(layers={6: rows}, fingerprint=SMOL).save(path)
    assert_clean_error(invoke("run", "Hello", "--steer", str(path), "--n-ctx", "256", "--max-tokens", "4"), "context")


def test_extract_refuses_non_gguf_output(workdir):
    out = workdir / "love.txt"
    assert_clean_error(invoke("extract", "-p", "Love", "-n", "Hate", "-l", "6", "-o", str(out)), ".gguf")
    assert not out.exists()


def test_help_has_examples():
    for command in ("extract", "run", "serve", "worker"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output
