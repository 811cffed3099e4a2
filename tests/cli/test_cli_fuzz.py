"""Random text in every checked argument, through the real CLI parser: only click's usage
errors (exit 2, one ``Error:`` line), never another exception.

Each example is parsed with the command's own ``make_context`` (the same parsing and type
conversion as a real run, without running the command); the texts it refuses are then run
through the whole CLI to check the one line and the exit code.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyactadd.cli import main
from pyactadd.vector.value import ModelFingerprint, SteeringVector

SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)

# Texts shaped like the specs (digits, separators, number syntax, look-alike digits,
# a lone surrogate as a non-UTF-8 byte decodes to) and any text at all.
_SPEC_CHARS = "0123456789-:,.eE+ _xinfaNb%²٣\udcff\n\t"
TEXT = st.one_of(st.text(alphabet=st.sampled_from(_SPEC_CHARS), max_size=24), st.text(max_size=24))
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "v.gguf"
    SteeringVector(layers={6: np.full((2, 576), 0.01, dtype=np.float32)}, fingerprint=SMOL).save(path)
    return path


# (command, arguments before the fuzzed value, the option it goes to, what the value is appended to)
CASES = {
    "steer": ("run", ["Hello"], "--steer", None),
    "steer-coeff": ("run", ["Hello"], "--steer", "VECTOR:"),
    "align": ("run", ["Hello"], "--align", None),
    "temperature": ("run", ["Hello"], "--temperature", None),
    "prompt": ("run", [], None, None),
    "layers": ("sweep", ["-p", "a", "-n", " "], "--layers", None),
    "coeffs": ("sweep", ["-p", "a", "-n", " "], "--coeffs", None),
    "budget": ("sweep", ["-p", "a", "-n", " "], "--budget", None),
    "convert-layer": ("convert", ["VECTOR", "OUT"], "--layer", None),
    "n-ctx": ("run", ["Hello"], "--n-ctx", None),
}


def _args(case: str, text: str, vector: Path, out: Path) -> tuple[str, list[str]]:
    command, before, option, prefix = CASES[case]
    value = (prefix or "").replace("VECTOR", str(vector)) + text
    before = [{"VECTOR": str(vector), "OUT": str(out)}.get(a, a) for a in before]
    # "--opt=VALUE" so that a value starting with "-" is not read as another option.
    return command, before + ([f"{option}={value}"] if option else ["--", value])


@pytest.mark.parametrize("case", list(CASES))
@FUZZ
@given(text=TEXT)
def test_random_argument_is_parsed_or_refused_as_usage(vector_file, tmp_path, case, text) -> None:
    command, args = _args(case, text, vector_file, tmp_path / "out.gguf")
    try:
        main.commands[command].make_context(command, list(args))
    except click.UsageError as exc:
        assert "\n" not in exc.format_message(), exc.format_message()
    else:
        return  # a valid value: running the command would load the model
    result = CliRunner().invoke(main, [command, *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert not (tmp_path / "out.gguf").exists()
