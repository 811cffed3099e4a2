"""Careless and hostile command-line input: each edge is one ``Error:`` line, the right exit
code, no traceback and no output file (real CLI, real default model)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.errors import InputError, SteeringFileError
from pyactadd.files import atomic_write
from pyactadd.prompts.pairs import load_pairs
from pyactadd.prompts.tokens import Tokenizer
from pyactadd.vector.value import ModelFingerprint, SteeringVector

SMOL = ModelFingerprint(architecture="llama", n_embd=576, n_layer=30, n_vocab=49152)
PYACTADD = Path(sys.executable).with_name("pyactadd")


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("edges") / "v.gguf"
    SteeringVector(layers={6: np.full((2, 576), 0.01, dtype=np.float32)}, fingerprint=SMOL).save(path)
    return path


def one_error(result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one line of output starting ``Error:``, no traceback; returns it."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def run_cli(*args: bytes | str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYACTADD), *args], capture_output=True, timeout=timeout)


def subprocess_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("Error: "), err
    for needle in needles:
        assert needle.lower() in err.lower(), err


# --- bytes that are not UTF-8 (they reach Python as lone surrogates)


@pytest.mark.parametrize(
    "args",
    [
        [b"run", b"hi \xff", b"--max-tokens", b"2"],
        [b"eval", b"--steer", b"VECTOR", b"--prompt", b"\xc3("],
        [b"sweep", b"-p", b"\xff", b"-n", b" ", b"--layers", b"6"],
        [b"sweep", b"-p", b"a", b"-n", b" ", b"--pad", b"\xfe"],
    ],
    ids=["run", "eval", "sweep-positive", "sweep-pad"],
)
def test_non_utf8_argument_is_refused_before_loading(vector_file, tmp_path, args):
    args = [os.fsencode(vector_file) if a == b"VECTOR" else a for a in args]
    proc = subprocess.run([str(PYACTADD), *args], capture_output=True, timeout=120, cwd=tmp_path)
    subprocess_error(proc, 2, "not UTF-8", "byte 0x")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_refuses_lone_surrogates(default_model_path):
    tokenizer = Tokenizer.from_model(default_model_path)
    for text in ("hi \udcff", "\ud800"):
        with pytest.raises(InputError, match="UTF-8|Unicode"):
            tokenizer.encode(text)
    with pytest.raises(InputError, match="pad"):
        tokenizer.single_token("\udcff", "pad")


# --- layer specs: ASCII digits only, ranges bounded before they are expanded


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("²", "cannot parse"), ("٣", "cannot parse"), ("1-1000000000", "no model has that many"),
     ("1-" + "9" * 5000, "out of range"), ("0", "layers start at 1"), ("3-5:0", "empty range")],
)
def test_sweep_layer_spec(tmp_path, spec, needle):
    out = tmp_path / "sw"
    line = one_error(invoke("sweep", "-p", "a", "-n", " ", "--layers", spec, "--out", str(out)), 2, "--layers", needle)
    assert "1073741824" not in line
    assert not out.exists()


def test_sweep_layer_past_the_model_names_its_range(vector_file, tmp_path):
    out = tmp_path / "sw"
    one_error(invoke("sweep", "--vector", str(vector_file), "--layers", "30", "--out", str(out)), 1, "30 blocks", "1 to 29")
    assert not out.exists()


@pytest.mark.parametrize(("spec", "needle"), [("1-999999999", "past any model"), ("²", "not a layer"), ("6-3", "backwards")])
def test_convert_layer_spec(vector_file, tmp_path, spec, needle):
    out = tmp_path / "out.gguf"
    one_error(invoke("convert", str(vector_file), str(out), "-l", spec), 2, needle)
    assert not out.exists()


# --- files and sizes


def test_deeply_nested_pairs_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"positive": "a", "negative": "b"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(InputError, match="line 2 nests JSON too deeply"):
        load_pairs(path)


def test_context_larger_than_memory_is_refused_before_allocation():
    # 2**20 positions of the default model's f16 KV cache: about 24 GB.
    proc = run_cli("run", "Hello", "--n-ctx", str(1 << 20), "--max-tokens", "2")
    if proc.returncode == 0:
        pytest.skip("this machine has room for a 24 GB KV cache")
    subprocess_error(proc, 2, "--n-ctx", "KV cache", "or less")


def test_serve_refuses_a_context_larger_than_memory():
    from pyactadd.default_model import default_model_path
    from pyactadd.runtime.context_memory import context_memory_problem

    if context_memory_problem(default_model_path(), 1 << 20) is None:
        pytest.skip("this machine has room for a 24 GB KV cache")  # serve would start and listen
    one_error(invoke("serve", "--n-ctx", str(1 << 20), "--port", "0"), 2, "--n-ctx", "KV cache", "or less")


def test_extract_refuses_a_prompt_longer_than_any_context(tmp_path):
    out = tmp_path / "long.gguf"
    result = invoke("extract", "-p", "love " * 20_000, "-n", "Hate", "-l", "6", "-o", str(out))
    one_error(result, 1, "the positive prompt is 20001 tokens", "8192 positions", "n_ctx_train", "shorten it to at most 8192")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("coeff", "code", "needles"),
    [
        ("1e39", 2, ("--coeff", "coefficient 1e+39 overflows float32", "use a smaller coefficient")),
        ("1e37", 1, ("coefficient 1e+37 overflows float32 when it scales the vector at layer 6", "use a coefficient of at most")),
    ],
)
def test_extract_names_a_coefficient_overflow(tmp_path, coeff, code, needles):
    out = tmp_path / "big.gguf"
    line = one_error(invoke("extract", "-p", "Love", "-n", "Hate", "-l", "6", "-c", coeff, "-o", str(out)), code, *needles)
    assert "re-extract" not in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_json_reports_the_context_llama_cpp_made(vector_file):
    import json

    result = invoke("run", "Hello", "--steer", str(vector_file), "--n-ctx", "100", "--max-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["n_ctx"] == 256  # llama.cpp rounds up to a multiple of 256


def test_disk_full_is_named(tmp_path):
    target = tmp_path / "out.bin"

    def write(temp: Path) -> None:
        with open("/dev/full", "wb") as full:  # the kernel's own ENOSPC
            full.write(b"x" * 65536)
            full.flush()

    with pytest.raises(SteeringFileError, match=r"disk full: cannot write .*out.bin \(No space left on device\): free space") as caught:
        atomic_write(target, write)
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KB tmpfs, filled; skipped where mounting is not allowed."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mount / "filler").write_bytes(b"\0" * 60_000)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_convert_onto_a_full_disk(vector_file, full_disk):
    out = full_disk / "x.gguf"
    one_error(invoke("convert", str(vector_file), str(out)), 1, "disk full")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# --- usage errors


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["run"], "Missing argument 'PROMPT' (or --prompts FILE) (see: main run --help)"), (["run", "x", "--bogus"], "No such option"),
     (["nocmd"], "No such command"), (["sweep"], "give --positive and --negative")],
)
def test_usage_errors_are_one_line(args, needle):
    one_error(invoke(*args), 2, needle, "--help")


def test_usage_error_from_the_real_command_line():
    proc = run_cli("run")
    subprocess_error(proc, 2, "Missing argument 'PROMPT' (or --prompts FILE) (see: pyactadd run --help)")
