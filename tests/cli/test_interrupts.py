"""Ctrl-C (SIGINT) sent to a real ``pyactadd`` process: exit code 130, one line, no traceback,
never ignored, and nothing half-written left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyactadd.vector.value import ModelFingerprint, SteeringVector

PYACTADD = Path(sys.executable).with_name("pyactadd")
SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)


def assert_interrupted(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for ``proc``; it must exit 130 with the single stderr line ``Interrupted.``."""
    out, err = proc.communicate(timeout=timeout)
    err_text = err.decode("utf-8", "replace")
    assert proc.returncode == 130, err_text
    assert "Traceback" not in err_text and "Exception ignored" not in err_text, err_text
    assert [line for line in err_text.splitlines() if line.strip()] == ["Interrupted."], err_text
    return out.decode("utf-8", "replace")


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(PYACTADD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_interrupt_during_generation():
    proc = start("run", "Once upon a time", "--max-tokens", "2000", "--temperature", "0")
    first = proc.stdout.read(40)  # the prompt and the first generated text: generation is under way
    assert first, "no output before the interrupt"
    proc.send_signal(signal.SIGINT)
    assert_interrupted(proc)


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0, 1.5])
def test_interrupt_while_starting_and_loading(delay):
    # From importing the commands to loading the model into llama.cpp (whose log callback
    # would swallow a KeyboardInterrupt) and the first tokens.
    proc = start("run", "Once upon a time", "--max-tokens", "2000")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    assert_interrupted(proc)


def _marked_start(*args: str) -> tuple[subprocess.Popen, threading.Event, threading.Thread, list[str]]:
    """Start ``pyactadd ARGS`` with Python's import-time lines on stderr; the event is set at the
    first line of ``signal`` or ``click``: the first modules pyactadd.cli imports, after it put
    its own SIGINT handler in. Earlier there is only Python itself: the interpreter, site and
    its .pth files, and finding the package."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.Popen([str(PYACTADD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    marked, lines = threading.Event(), []

    def read() -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            if line.endswith((" signal", " click")):
                marked.set()
        marked.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, marked, reader, lines


@pytest.mark.parametrize("delay_ms", [0, 1, 3, 10, 30, 60, 100])
def test_interrupt_in_the_first_tenth_of_a_second(delay_ms):
    # From the commands' imports through the moment between importing them and main() (where
    # Python's own handler used to be back, printing a KeyboardInterrupt traceback).
    proc, marked, reader, lines = _marked_start("run", "Once upon a time", "--max-tokens", "2000")
    assert marked.wait(60)
    time.sleep(delay_ms / 1000)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    reader.join(10)
    said = [line for line in lines if line.strip() and not line.startswith("import time:")]
    assert "Traceback" not in "\n".join(said), "\n".join(said)
    assert proc.returncode == 130, said
    assert said == ["Interrupted."], said


# The console script's own code, with SIGINT sent while a given module is being imported.
_ENTRY = textwrap.dedent(
    """
    import os, signal, sys

    MODULE = sys.argv[1]

    class InterruptOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == MODULE:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, InterruptOnImport())
    sys.argv = ["pyactadd", "run", "Hello"]
    from pyactadd.cli import main
    sys.exit(main())
    """
)


@pytest.mark.parametrize("module", ["click", "numpy", "pyactadd.runtime.steering"])
def test_interrupt_during_imports(module):
    proc = subprocess.Popen([sys.executable, "-c", _ENTRY, module], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert_interrupted(proc)


def test_interrupt_between_import_and_main():
    # What the console script does, with SIGINT exactly between its import and its main() call.
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.argv = [{str(PYACTADD)!r}, "run", "Hello"]
        from pyactadd.cli import main
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert_interrupted(proc)


def test_ignored_sigint_stays_ignored():
    # A background job of a shell script ignores SIGINT; pyactadd must not take that back.
    proc = subprocess.run(
        ["sh", "-c", f"trap '' INT; exec {PYACTADD} run Hi --max-tokens 1 --n-ctx 64"], capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def test_interrupt_during_sweeps_float32_copy(tmp_path, cache_dir):
    vector = tmp_path / "v.gguf"
    SteeringVector(layers={6: np.full((2, 576), 0.01, dtype=np.float32)}, fingerprint=SMOL).save(vector)
    copies = cache_dir / "gguf-f32"
    copies.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    stale = copies / f".model-f32.gguf.{dead.pid}-00ff.tmp"
    in_use = copies / f".model-f32.gguf.{alive.pid}-00ff.tmp"
    stale.write_bytes(b"left by a killed run")
    in_use.write_bytes(b"still being written")
    env = {**os.environ, "PYACTADD_CACHE_DIR": str(cache_dir)}
    try:
        proc = start("sweep", "--vector", str(vector), "--layers", "6", "--coeffs", "1", "--controls", "0",
                     "--out", str(tmp_path / "sw"), env=env)
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") and str(proc.pid) in p.name for p in copies.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the float32 copy never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert_interrupted(proc)
        # The interrupted copy is gone, the dead run's leftover too; a live writer's file stays.
        assert sorted(p.name for p in copies.iterdir()) == [in_use.name]
        assert not (tmp_path / "sw" / "sweep.json").exists()
    finally:
        alive.kill()
        alive.wait()
