"""The scripts in convert/ run with only gguf and numpy: no torch, click, llama_cpp,
transformers or compiled engine, and write what ``pyactadd convert`` writes, byte for byte.

Each script runs in a subprocess whose imports of the heavy packages fail (a meta-path
blocker installed by a ``sitecustomize`` on PYTHONPATH), so a stray import anywhere in
``pyactadd.vector`` fails these tests. The stock output is checked with llama.cpp's own
control-vector loader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pyactadd.vector.value import SteeringVector

from helpers.vector_files import invoke, per_position_vector, rows, stock_loader, write_repeng

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "convert"
BLOCKED = ("torch", "click", "llama_cpp", "transformers", "pyactadd._engine")

SITECUSTOMIZE = f'''
import sys

BLOCKED = {BLOCKED!r}


class _Blocker:
    """Fail every import of a blocked package, as on a machine without it."""

    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in BLOCKED):
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None


sys.meta_path.insert(0, _Blocker())
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("blocker")
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(directory))
    return env


def run_python(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def loader():
    return stock_loader()


@pytest.mark.parametrize("module", BLOCKED)
def test_the_blocker_blocks(blocked_env, tmp_path, module):
    """Without this the tests below could pass on a machine that merely has the packages."""
    result = run_python(blocked_env, "-c", f"import {module}", cwd=tmp_path)
    assert result.returncode != 0 and "blocked by the test" in result.stderr, result.stderr


def test_importing_the_vector_stage_pulls_in_nothing_heavy(blocked_env, tmp_path):
    code = (
        "import sys; import pyactadd, pyactadd.vector, pyactadd.vector.convert, pyactadd.vector.convert.script; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r} or m == 'pyactadd._engine'))"
    )
    result = run_python(blocked_env, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_repeng_file_to_stock_control_vector_matches_pyactadd_convert(blocked_env, tmp_path, loader):
    from helpers.llama_cpp_loader import run_loader

    directions = {i: rows(i, width=576) / 10 for i in (2, 9, 14)}
    source = write_repeng(tmp_path / "repeng.gguf", directions, model_type="mistral")
    out = tmp_path / "script.gguf"
    result = run_python(blocked_env, str(SCRIPTS / "convert_to_control_vector.py"), str(source), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stderr and "repeng" in result.stderr

    reference = tmp_path / "cli.gguf"
    assert invoke("convert", source, reference, "--llama-cpp").exit_code == 0
    assert out.read_bytes() == reference.read_bytes()

    loaded = run_loader(loader, out, 1.0)
    assert loaded.returncode == 0, loaded.stderr
    for i, direction in directions.items():
        np.testing.assert_array_equal(loaded.data[i - 1], direction)  # row il-1 of llama.cpp's buffer is direction.il


def test_per_position_file_needs_a_reduction_and_then_matches(blocked_env, tmp_path):
    source = tmp_path / "love.gguf"
    per_position_vector(width=576, layers=(3, 7), n_positions=4).save(source)
    script = str(SCRIPTS / "convert_to_control_vector.py")
    out = tmp_path / "out.gguf"
    refused = run_python(blocked_env, script, str(source), "-o", str(out), cwd=tmp_path)
    assert refused.returncode == 1 and not out.exists()
    assert refused.stderr.startswith("convert_to_control_vector.py: error: ") and "--reduce" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    result = run_python(blocked_env, script, str(source), "-o", str(out), "--reduce", "mean", "--layer", "7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "cli.gguf"
    assert invoke("convert", source, reference, "--llama-cpp", "--reduce", "mean", "--layer", "7").exit_code == 0
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("suffix, options", [(".gguf", ["--align", "front"]), (".npz", ["--to-convention", "block-output"])])
def test_back_from_a_control_vector(blocked_env, tmp_path, suffix, options):
    source = write_repeng(tmp_path / "repeng.gguf", {5: rows(5)})
    script = str(SCRIPTS / "convert_from_control_vector.py")
    out = tmp_path / f"script{suffix}"
    result = run_python(blocked_env, script, str(source), "-o", str(out), *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reference = tmp_path / f"cli{suffix}"
    assert invoke("convert", source, reference, *options).exit_code == 0
    if suffix == ".gguf":
        assert out.read_bytes() == reference.read_bytes()
        again = SteeringVector.load(out)
        assert again.alignment == "front" and again.layer_ids == [6]
    else:
        ours, theirs = np.load(out), np.load(reference)
        assert sorted(ours) == sorted(theirs) == ["5"]
        np.testing.assert_array_equal(ours["5"], theirs["5"])


def test_pt_files_say_they_need_torch(blocked_env, tmp_path):
    source = tmp_path / "sv.pt"
    with zipfile.ZipFile(source, "w") as archive:  # torch's zip layout; never unpickled, torch is missing first
        archive.writestr("sv/data.pkl", b"")
    result = run_python(
        blocked_env, str(SCRIPTS / "convert_to_control_vector.py"), str(source), "-o", str(tmp_path / "o.gguf"),
        "--layer-convention", "block-output", cwd=tmp_path,
    )
    assert result.returncode == 1 and "needs torch" in result.stderr, result.stderr
