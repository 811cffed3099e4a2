"""Running a misuse script in its own interpreter: a crash there (a segfault, an abort in
llama.cpp) fails the test instead of ending the test session."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_alive(prelude: str, body: str, expected: list[str]) -> list[str]:
    """Run ``prelude + body``; it must exit 0 without a traceback, print one line per
    ``expected`` fragment (in order) and then ``still alive``. Returns its stdout lines."""
    script = prelude + textwrap.dedent(body) + "\nprint('still alive')\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"
    lines = result.stdout.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1] == "still alive", result.stdout
    assert len(lines) == len(expected) + 1, result.stdout
    for fragment, line in zip(expected, lines):
        assert fragment in line, (fragment, result.stdout)
    return lines
