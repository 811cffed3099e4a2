"""The C API from C and C++: what an application embedding the engine gets.

* ``cpp/tests/engine_test`` (every C API entry point, hand-written GGUF files, the eval
  callback on synthetic ggml graphs on the host and device-copy paths) under
  AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer, built by CMake with
  ``-DPYACTADD_SANITIZE=ON``, and under valgrind (memcheck) from a plain build.
* ``cpp/examples/steer.cpp`` compiled with exactly ``c++ steer.cpp $(pyactadd config
  --cflags --libs)``: its greedy text on the default model equals ``pyactadd run
  --temperature 0`` steered and unsteered, with and without an anchor token; the same
  program built with the sanitizers, and under valgrind with a libggml-cpu of the same
  llama.cpp built without AVX-512 (``ggml_portable.py``: valgrind cannot run the wheel's
  ``-march=native`` one on an AVX-512 machine).
* Several sequences in one ``llama_decode``: rows are matched by position only, so each
  sequence gets the rows at its own positions, exactly as when decoded alone.

Builds are cached under ``build/`` (``standalone-asan``, ``standalone-plain``, ``c-api``,
``ggml-portable``), so only the first run pays for compiling (about 40 s on two cores, plus
2-3 minutes for the portable libggml-cpu).

Nothing here skips: a missing cmake, ninja, C/C++ compiler, valgrind or ``pyactadd``
console script fails the test that needs it, with what to install.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.ggml_portable import PortableGgmlUnavailable, build_portable_ggml_cpu, check_drop_in, find_tool
from pyactadd.cli import main
from pyactadd.vector.value import SteeringVector

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
STEER_SOURCE = ROOT / "cpp" / "examples" / "steer.cpp"

PROMPT = "I hate you because"
N_PREDICT = 16
COEFF = 1.5  # exercises FILE:COEFF parsing and the engine's scaling on both sides
LAYER = 6  # block input 6 = l_out-5

TEST_EXTRAS = "pip install -e '.[test]' (the test extras bring cmake and ninja)"


def required_tool(name: str, install_hint: str) -> str:
    """Path of a tool the tests need; a missing one fails the test (never a skip)."""
    try:
        return find_tool(name, install_hint)
    except PortableGgmlUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def toolchain() -> dict[str, str]:
    """cmake and ninja (the test extras) and the C and C++ compilers (c++ and cc on PATH)."""
    tools = {name: required_tool(name, TEST_EXTRAS) for name in ("cmake", "ninja")}
    for name in ("c++", "cc"):
        if shutil.which(name) is None:
            pytest.fail(f"no C/C++ compiler: {name} is not on PATH (apt-get install g++)", pytrace=False)
        tools[name] = shutil.which(name)
    return tools


@pytest.fixture(scope="module")
def valgrind() -> str:
    found = shutil.which("valgrind")
    if found is None:
        pytest.fail("valgrind is not installed: apt-get install valgrind", pytrace=False)
    return found


# memcheck, the same for every run: any memory error exits 1 (--error-exitcode), and so
# do leaks of the two kinds that count, "definitely lost" and "indirectly lost".
# "Possibly lost" blocks are listed (in the output shown when a test fails) but do not
# fail: libgomp never joins its worker threads, so the thread-local storage glibc gives
# each one (pthread_create -> allocate_dtv, 304 bytes per thread here) is only reachable
# through an interior pointer at exit. That is OpenMP inside ggml, not our code, and it
# would fail every multi-threaded run.
VALGRIND_OPTIONS = [
    "--error-exitcode=1",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite,indirect",
    "--show-leak-kinds=definite,indirect,possible",
    "-q",
]

# Sanitizer runtime settings: leaks are errors, any UB report is fatal (the build also
# passes -fno-sanitize-recover=undefined).
ASAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:strict_string_checks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def run(cmd, *, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    merged = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, env=merged, capture_output=True, timeout=timeout, **kwargs)


def output_of(proc: subprocess.CompletedProcess) -> str:
    def text(b):
        return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")

    return f"exit {proc.returncode}\n--- stdout\n{text(proc.stdout)[-4000:]}\n--- stderr\n{text(proc.stderr)[-8000:]}"


def run_sanitized(cmd, **kwargs) -> subprocess.CompletedProcess:
    """Run an ASan/UBSan binary with leak detection, without it where LSan cannot work.

    LeakSanitizer stops the process with ptrace at exit to scan it; under a tracer
    (strace, gdb, some container sandboxes) that fails. It works in this project's CI
    sandbox; elsewhere the run is repeated with detect_leaks=0 rather than failing.
    """
    proc = run(cmd, env=ASAN_ENV, **kwargs)
    if proc.returncode != 0 and b"LeakSanitizer does not work under ptrace" in proc.stderr:
        env = dict(ASAN_ENV, ASAN_OPTIONS=ASAN_ENV["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0"))
        proc = run(cmd, env=env, **kwargs)
    return proc


def cmake_build(tools: dict[str, str], name: str, options: list[str]) -> Path:
    """Configure (once per option set) and build ``build/<name>``; returns the build directory."""
    build_dir = BUILD / name
    stamp = build_dir / ".pyactadd-test-options"
    wanted = "\n".join(options + [sys.executable])
    if not (build_dir / "CMakeCache.txt").is_file() or not stamp.is_file() or stamp.read_text() != wanted:
        # Ninja for a new build directory (an existing one keeps its generator).
        generator = (
            [] if (build_dir / "CMakeCache.txt").is_file() else ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}"]
        )
        proc = run(
            [tools["cmake"], "-S", str(ROOT), "-B", str(build_dir), *generator, f"-DPython_EXECUTABLE={sys.executable}",
             *options]
        )
        assert proc.returncode == 0, output_of(proc)
        stamp.write_text(wanted)
    proc = run([tools["cmake"], "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], timeout=600)
    assert proc.returncode == 0, output_of(proc)
    return build_dir


STANDALONE = ["-DPYACTADD_BUILD_PYTHON=OFF", "-DPYACTADD_BUILD_EXAMPLES=ON", "-DPYACTADD_BUILD_TESTS=ON"]


@pytest.fixture(scope="module")
def asan_build(toolchain) -> Path:
    return cmake_build(toolchain, "standalone-asan", STANDALONE + ["-DPYACTADD_SANITIZE=ON"])


@pytest.fixture(scope="module")
def plain_build(toolchain) -> Path:
    # -O2 -g: fast enough for valgrind, with line numbers in its reports.
    return cmake_build(toolchain, "standalone-plain", STANDALONE + ["-DCMAKE_BUILD_TYPE=RelWithDebInfo"])


def pyactadd_command() -> str:
    """The ``pyactadd`` console script of this Python (the one pytest runs on)."""
    beside = Path(sys.executable).with_name("pyactadd")
    found = str(beside) if beside.is_file() else shutil.which("pyactadd")
    if found is None:
        pytest.fail(
            f"the pyactadd console script is neither beside {sys.executable} nor on PATH: {TEST_EXTRAS}", pytrace=False
        )
    return found


@pytest.fixture(scope="module")
def config_steer(toolchain) -> Path:
    """steer.cpp compiled the way the README tells C/C++ users to: against the installed pyactadd."""
    out_dir = BUILD / "c-api"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "pyactadd-steer"
    # Exactly the documented command line (plus -o), through a shell for the $(...).
    command = f"c++ {shlex.quote(str(STEER_SOURCE))} $({shlex.quote(pyactadd_command())} config --cflags --libs) -o {shlex.quote(str(exe))}"
    proc = run(["bash", "-c", command], cwd=ROOT)
    assert proc.returncode == 0, f"{command}\n{output_of(proc)}"
    return exe


# --- steering files and the pyactadd reference ---------------------------------------------


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, default_model_path) -> dict[str, Path]:
    """A random front-aligned vector (3 rows at layer 6), without and with an anchor token.

    Random rows of norm ~190 (residual norms are ~150 at that layer) change the greedy
    text within a few tokens, so "steered == unsteered" cannot pass by accident.
    """
    from pyactadd.prompts.tokens import Tokenizer, fingerprint_of

    fingerprint = fingerprint_of(default_model_path)
    rows = (np.random.default_rng(0).standard_normal((3, fingerprint.n_embd)) * 8).astype(np.float32)
    anchor_id = Tokenizer.from_model(default_model_path).single_token("<|im_start|>", "anchor")
    directory = tmp_path_factory.mktemp("c-api")
    files = {
        "plain": SteeringVector(layers={LAYER: rows}, fingerprint=fingerprint),
        "anchored": SteeringVector(layers={LAYER: rows}, fingerprint=fingerprint, anchor="<|im_start|>", anchor_id=anchor_id),
    }
    paths = {}
    for name, vector in files.items():
        paths[name] = directory / f"{name}.gguf"
        vector.save(paths[name])
    return paths


_references: dict[tuple[str, int], dict] = {}


def reference(path: Path, n_predict: int) -> dict:
    """``pyactadd run PROMPT --steer FILE:COEFF --temperature 0 --max-tokens N --json --compare``."""
    key = (str(path), n_predict)
    if key not in _references:
        result = CliRunner().invoke(
            main,
            ["run", PROMPT, "--steer", f"{path}:{COEFF}", "--temperature", "0", "--max-tokens", str(n_predict),
             "--json", "--compare", "--threads", "1"],
        )
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        _references[key] = payload
    return _references[key]


def steer_args(model: Path, path: Path, n_predict: int, *extra: str) -> list[str]:
    # -t 1 and --threads 1 mean the same on both sides (one thread for generated tokens,
    # all cores for the prompt); one thread keeps the test fast on a busy machine, where
    # ggml's threads wait for each other at every graph node.
    return ["-m", str(model), "-s", f"{path}:{COEFF}", "-n", str(n_predict), "-p", PROMPT, "-t", "1", *extra]


# --- (a) the engine's own C test -------------------------------------------------------------


def test_engine_test_under_asan_ubsan_lsan(asan_build, default_model_path):
    # With the model: an engine given params.model, and files made for another model.
    proc = run_sanitized([str(asan_build / "engine_test"), str(default_model_path)])
    assert proc.returncode == 0, output_of(proc)
    assert b", 0 failed" in proc.stderr
    assert b"model checks run on" in proc.stderr, output_of(proc)


def test_engine_test_under_valgrind(plain_build, valgrind):
    proc = run([valgrind, *VALGRIND_OPTIONS, str(plain_build / "engine_test")])
    assert proc.returncode == 0, output_of(proc)


# --- pyactadd config -------------------------------------------------------------------------


def test_config_prints_existing_paths():
    result = CliRunner().invoke(main, ["config", "--cflags", "--libs"])
    assert result.exit_code == 0, result.output
    words = result.stdout.split()
    includes = [Path(w[2:]) for w in words if w.startswith("-I")]
    lib_dirs = [Path(w[2:]) for w in words if w.startswith("-L")]
    assert any((d / "pyactadd.h").is_file() for d in includes)
    assert any((d / "llama.h").is_file() for d in includes)
    assert any((d / "libpyactadd.so").is_file() for d in lib_dirs)
    assert any((d / "libllama.so").is_file() for d in lib_dirs)
    assert {"-lpyactadd", "-lllama", "-lggml", "-lggml-base"} <= set(words)
    assert sum(w.startswith("-Wl,-rpath,") for w in words) == 2
    # Each half alone, and neither: a usage error.
    assert CliRunner().invoke(main, ["config", "--cflags"]).stdout.split() == [w for w in words if w.startswith("-I")]
    assert "-lpyactadd" in CliRunner().invoke(main, ["config", "--libs"]).stdout.split()
    assert CliRunner().invoke(main, ["config"]).exit_code == 2


def test_config_flags_build_the_example(config_steer):
    # Built by the fixture with `c++ steer.cpp $(pyactadd config --cflags --libs)`; it
    # must run from anywhere without LD_LIBRARY_PATH (the rpaths) and fail cleanly.
    proc = run([str(config_steer), "-m", "/nonexistent.gguf", "-s", "x.gguf", "-n", "1"], cwd="/")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1].startswith("steer: error: unable to load model")
    proc = run([str(config_steer)])
    assert proc.returncode == 1 and b"usage:" in proc.stderr


# --- (b) the example program equals pyactadd run ----------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "anchored"])
def test_example_matches_pyactadd_run(config_steer, vectors, default_model_path, kind):
    path = vectors[kind]
    expected = reference(path, N_PREDICT)
    assert expected["completions"]["steered"] != expected["completions"]["unsteered"]
    anchor_id = SteeringVector.load(path).anchor_id
    if kind == "anchored":
        assert anchor_id is not None and expected["prompt_tokens"][0] == anchor_id  # prepended by pyactadd run
    else:
        assert anchor_id is None

    steered = run([str(config_steer), *steer_args(default_model_path, path, N_PREDICT)])
    assert steered.returncode == 0, output_of(steered)
    unsteered = run([str(config_steer), *steer_args(default_model_path, path, N_PREDICT, "--no-steer")])
    assert unsteered.returncode == 0, output_of(unsteered)

    assert steered.stdout.decode("utf-8", "ignore") == expected["completions"]["steered"]
    assert unsteered.stdout.decode("utf-8", "ignore") == expected["completions"]["unsteered"]


def test_example_refuses_bad_input(config_steer, vectors, default_model_path, tmp_path):
    """Every failure is one `steer: error: ...` line and exit code 1."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    back = tmp_path / "back.gguf"
    vector = SteeringVector.load(vectors["plain"])
    SteeringVector(layers=vector.layers, fingerprint=vector.fingerprint, alignment="back").save(back)
    model = str(default_model_path)
    cases = [
        (["-m", model, "-s", str(tmp_path / "missing.gguf"), "-n", "2"], "missing.gguf"),
        (["-m", model, "-s", str(garbage), "-n", "2"], "cannot read"),
        (["-m", model, "-s", str(back), "-n", "2"], "prompt length"),
        (["-m", model, "-s", f"{vectors['plain']}:nan", "-n", "2"], "finite"),
        (["-m", model, "-s", str(vectors["plain"]), "-n", "0"], "-n"),
        (["-m", model, "-s", str(vectors["plain"]), "-n", "2", "-p", ""], "empty prompt"),
        (["-m", model, "-s", str(vectors["plain"]), "-n", "4000", "-c", "64"], "exceeds the context"),
        (["-m", model, "-s", str(vectors["plain"]), "-n", "2", "--bogus"], "unknown argument"),
    ]
    for args, needle in cases:
        proc = run([str(config_steer), *args])
        last = proc.stderr.decode().strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert proc.returncode == 1, (args, output_of(proc))
        assert last.startswith("steer: error: ") and needle in last, (args, output_of(proc))
        assert proc.stdout == b"", args


def vector_for_another_model(source: Path, directory: Path, **changes) -> Path:
    """``source``'s rows saved with a fingerprint naming another model (``changes`` to it)."""
    vector = SteeringVector.load(source)
    fingerprint = dataclasses.replace(vector.fingerprint, **changes)
    path = directory / ("other-" + "-".join(changes) + ".gguf")
    SteeringVector(layers=vector.layers, fingerprint=fingerprint).save(path)
    return path


@pytest.mark.parametrize(
    "changes, differs",
    [({"n_vocab": 50000}, "n_vocab"), ({"architecture": "gemma3"}, "architecture"), ({"n_layer": 40}, "n_layer")],
)
def test_example_refuses_a_vector_for_another_model(config_steer, vectors, default_model_path, tmp_path, changes, differs):
    """The engine is given the model, so a file whose fingerprint names another is refused:
    one `steer: error:` line naming the difference and the fix, exit code 1, no text."""
    path = vector_for_another_model(vectors["plain"], tmp_path, **changes)
    proc = run([str(config_steer), *steer_args(default_model_path, path, 2)])
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1, output_of(proc)
    assert len(lines) == 1 and lines[0].startswith("steer: error: "), output_of(proc)
    assert f"({differs} " in lines[0] and "re-extract the vector for this model" in lines[0], lines[0]
    assert proc.stdout == b""


def test_file_info_matches_the_python_reader(vectors, tmp_path):
    """pyactadd_file_read_info (through the binding) reports what SteeringVector.load reads,
    for pyactadd's own files and for a stock llama.cpp control vector."""
    from pyactadd.native import engine_module
    from pyactadd.vector.layers import to_llama_index

    plain = SteeringVector.load(vectors["plain"])
    back = tmp_path / "back.gguf"
    SteeringVector(layers=plain.layers, fingerprint=plain.fingerprint, alignment="back").save(back)
    stock = tmp_path / "stock.gguf"  # one row per layer, no pyactadd.* keys
    one_row = {LAYER: plain.layers[LAYER][:1], LAYER + 2: plain.layers[LAYER][1:2]}
    SteeringVector(layers=one_row, fingerprint=plain.fingerprint).save(stock, llama_cpp=True)
    for path in (vectors["plain"], vectors["anchored"], back, stock):
        vector = SteeringVector.load(path)
        info = engine_module().read_file_info(str(path))
        fingerprint = vector.fingerprint
        expected = {
            "source": vector.source,
            "alignment": vector.alignment,
            "anchor": vector.anchor,
            "anchor_token_id": -1 if vector.anchor_id is None else vector.anchor_id,
            "has_fingerprint": vector.source == "pyactadd",
            "model_architecture": (fingerprint.architecture or "") if vector.source == "pyactadd" else "",
            "model_n_embd": fingerprint.n_embd,
            "model_n_layer": fingerprint.n_layer or 0,
            "model_n_vocab": fingerprint.n_vocab or 0,
            "n_positions": vector.n_positions,
            "layers": [to_llama_index(layer) for layer in vector.layer_ids],
        }
        assert info == expected, path
    assert engine_module().read_file_info(str(vectors["anchored"]))["anchor_token_id"] >= 0
    with pytest.raises(ValueError, match="cannot read"):
        engine_module().read_file_info(str(tmp_path / "missing.gguf"))


# --- the example under the sanitizers and valgrind ---------------------------------------------

SHORT = 4  # tokens: enough to cover the steered prompt and single-token decoding


def test_example_under_asan_ubsan_lsan(asan_build, vectors, default_model_path, tmp_path):
    """The in-tree engine, instrumented, inside real llama.cpp inference (llama.cpp itself is not instrumented);
    and its refusal of a file made for another model, which must free everything too."""
    path = vectors["plain"]
    proc = run_sanitized([str(asan_build / "pyactadd-steer"), *steer_args(default_model_path, path, SHORT)])
    assert proc.returncode == 0, output_of(proc)
    text = proc.stdout.decode("utf-8", "ignore")
    assert text and reference(path, N_PREDICT)["completions"]["steered"].startswith(text)
    other = vector_for_another_model(path, tmp_path, n_vocab=50000)
    proc = run_sanitized([str(asan_build / "pyactadd-steer"), *steer_args(default_model_path, other, SHORT)])
    assert proc.returncode == 1 and b"re-extract the vector for this model" in proc.stderr, output_of(proc)
    assert b"Sanitizer" not in proc.stderr, output_of(proc)


@pytest.fixture(scope="module")
def portable_ggml_cpu(toolchain) -> Path:
    """Directory with a libggml-cpu.so.0 of the installed llama.cpp built without AVX-512 (``ggml_portable.py``).

    Built from the pinned sdist on first use and cached under ``build/ggml-portable``;
    ``PYACTADD_VALGRIND_GGML_CPU_DIR`` names a ready-made one instead (same checks).
    """
    given = os.environ.get("PYACTADD_VALGRIND_GGML_CPU_DIR")
    try:
        return Path(given) if given else build_portable_ggml_cpu()
    except PortableGgmlUnavailable as exc:
        pytest.fail(f"cannot build the portable libggml-cpu for valgrind: {exc}", pytrace=False)


def test_example_under_valgrind(plain_build, valgrind, portable_ggml_cpu, vectors, default_model_path):
    """steer.cpp's whole run (model load, steered prompt, decoding, teardown) under memcheck.

    llama-cpp-python's libggml-cpu is built with -march=native; on an AVX-512 machine it
    runs AVX-512 code from ggml_cpu_init on, which valgrind (3.19 to 3.24 at least) cannot
    execute (SIGILL). So the dynamic loader is given the same llama.cpp's libggml-cpu built
    for AVX2 first on LD_LIBRARY_PATH; libllama, libggml and libggml-base stay the wheel's.
    """
    exe = plain_build / "pyactadd-steer"
    try:
        env = check_drop_in(portable_ggml_cpu, exe)
    except PortableGgmlUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    # One thread: valgrind runs threads one at a time, and OpenMP's spin-waiting would
    # make a multi-threaded run much slower for no extra coverage of our code.
    env["OMP_WAIT_POLICY"] = "passive"
    path = vectors["plain"]
    proc = run([valgrind, *VALGRIND_OPTIONS, str(exe), *steer_args(default_model_path, path, SHORT)], env=env, timeout=600)
    assert b"Illegal opcode" not in proc.stderr, (
        f"valgrind met an instruction it cannot execute although {portable_ggml_cpu} was first on LD_LIBRARY_PATH:\n"
        + output_of(proc)
    )
    assert proc.returncode == 0, output_of(proc)
    text = proc.stdout.decode("utf-8", "ignore")
    assert text and reference(path, N_PREDICT)["completions"]["steered"].startswith(text)


# --- several sequences in one llama_decode -----------------------------------------------------


def test_two_sequences_in_one_batch_match_decoding_each_alone(default_model_path):
    """Rows are matched by position only (pyactadd.h): two sequences both starting at position 0
    each receive rows 0..P-1, and their logits equal decoding each sequence alone.

    Runs with both KV-cache layouts: a unified cache (one micro-batch) and per-sequence
    streams (llama.cpp splits the batch into equal per-sequence micro-batches).
    """
    import llama_cpp as lc

    from pyactadd.native import engine_module
    from pyactadd.prompts.tokens import Tokenizer

    tokenizer = Tokenizer.from_model(default_model_path)
    seqs = {
        0: tokenizer.encode("The quick brown fox jumps over the lazy dog while the farmer watches"),
        1: tokenizer.encode("I hate you because my cat"),
    }
    n_rows = 3
    model = lc.llama_model_load_from_file(str(default_model_path).encode(), lc.llama_model_default_params())
    assert model
    try:
        n_embd, n_layer = lc.llama_model_n_embd(model), lc.llama_model_n_layer(model)
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        rows = (np.random.default_rng(0).standard_normal((n_rows, n_embd)) * 8).astype(np.float32)

        def decode_all(ctx, batch_seqs) -> dict[int, np.ndarray]:
            """One llama_decode of the given sequences (all from position 0); logits of every token."""
            n = sum(len(t) for t in batch_seqs.values())
            batch = lc.llama_batch_init(n, 0, 2)
            try:
                index = {}
                i = 0
                for seq, ids in batch_seqs.items():
                    for pos, token in enumerate(ids):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, 1
                        batch.seq_id[i][0] = seq
                        index[seq, pos] = i
                        i += 1
                batch.n_tokens = n
                assert lc.llama_decode(ctx, batch) == 0
                return {
                    seq: np.stack([
                        np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, index[seq, p]), shape=(n_vocab,)).astype(np.float64)
                        for p in range(len(ids))
                    ])
                    for seq, ids in batch_seqs.items()
                }
            finally:
                lc.llama_batch_free(batch)

        def measure(kv_unified: bool, steer: bool):
            engine = engine_module().Engine(n_embd, n_layer, False)
            if steer:
                engine.add(LAYER - 1, rows, 0, False)
            params = lc.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 256, 512, 512, 2
            # One thread: the result does not depend on it (measured), and a loaded CI
            # machine slows multi-threaded ggml far more than a single thread.
            params.n_threads = params.n_threads_batch = 1
            params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.kv_unified = kv_unified
            engine.attach(ctypes.addressof(params))
            ctx = lc.llama_init_from_model(model, params)
            assert ctx
            try:
                engine.reset_stats()
                together = decode_all(ctx, seqs)
                stats = engine.stats()
                alone = {}
                for seq, ids in seqs.items():
                    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                    alone[seq] = decode_all(ctx, {seq: ids})[seq]
                return together, alone, stats
            finally:
                lc.llama_free(ctx)  # before the engine it calls into goes away

        for kv_unified in (True, False):
            together, alone, stats = measure(kv_unified, steer=True)
            _, unsteered, _ = measure(kv_unified, steer=False)
            assert stats["n_errors"] == 0
            assert stats["n_rows_added"] == 2 * n_rows, stats  # rows 0..2 for each sequence
            for seq in seqs:
                # The rows reached both sequences (steered differs from unsteered)...
                assert np.abs(alone[seq][-1] - unsteered[seq][-1]).max() > 1.0
                # ...and each sequence in the shared batch equals it decoded alone.
                # Measured max |difference| 0.0 for both KV layouts (CPU; one and two threads).
                assert np.abs(together[seq] - alone[seq]).max() <= 1e-4, (kv_unified, seq)
    finally:
        lc.llama_model_free(model)
