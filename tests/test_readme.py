"""The README's two commands are the ones CI and users run: keep them honest."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(heading: str) -> str:
    after = (ROOT / "README.md").read_text().split(heading, 1)[1]
    return re.search(r"```sh\n(.*?)\n```", after, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "Set up and run the tests:" in ci
    command = readme_command("Set up and run the tests:")
    assert "torch==2.13.0" in command and "pytest" in command


def test_main_command_runs_extract_and_compare_on_the_default_model():
    command = readme_command("steered completions side by side:")
    assert "torch==2.13.0" in command
    assert "pyactadd extract" in command and "pyactadd run" in command and "--compare" in command
    assert "--model" not in command
