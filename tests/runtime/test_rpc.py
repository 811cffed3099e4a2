"""Steering with the model's layers on llama.cpp RPC workers (`pyactadd worker`), on loopback.

Every test starts its own workers on 127.0.0.1 (a worker serves one client at a time,
and a process keeps its connection to a worker until it exits), runs the real CLI in
subprocesses and stops the workers after. The engine's exactness tests over RPC are in
test_engine_exact.py (parametrized ``rpc``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers.rpc_launcher import LocalWorkers
from helpers.server_launcher import ServerProcess

PROMPT = "I hate you because"
CLI = [sys.executable, "-m", "pyactadd"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def completions(*args: str) -> dict:
    result = cli("run", PROMPT, "--temperature", "0", "--max-tokens", "24", "--json", "--compare", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["completions"]


@pytest.fixture(scope="module")
def love(tmp_path_factory):
    path = tmp_path_factory.mktemp("rpc") / "love.gguf"
    result = cli("extract", "-p", "Love", "-n", "Hate", "-l", "6", "-o", str(path))
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def love_all(love):
    """The last row of love.gguf as a one-row vector for every position (llama.cpp's own control vector)."""
    path = love.with_name("love-all.gguf")
    result = cli("convert", str(love), str(path), "--reduce", "row:1", "--align", "all")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def workers():
    pair = LocalWorkers(2)
    yield pair
    pair.stop()


@pytest.mark.parametrize("align", ["front", "all"])
def test_two_workers_equal_local_token_for_token(love, love_all, workers, align):
    steer = f"{love}:5" if align == "front" else f"{love_all}:2"
    local = completions("--steer", steer, "--align", align)
    remote = completions("--steer", steer, "--align", align, "--rpc", workers.spec)
    assert local["steered"] != local["unsteered"], "the vector must change the text for the test to mean anything"
    assert remote == local


def test_uneven_split_with_local_layers_equals_local(love, workers):
    """--rpc-split and --rpc-layers: 20 layers over the two workers 1:3, the first ones here."""
    local = completions("--steer", f"{love}:5")
    remote = completions("--steer", f"{love}:5", "--rpc", workers.spec, "--rpc-split", "1,3", "--rpc-layers", "20")
    assert remote == local


def test_worker_not_listening_is_one_line(love):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = cli("run", PROMPT, "--steer", str(love), "--rpc", f"127.0.0.1:{port}", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no RPC worker is listening at 127.0.0.1:" + str(port)), result.stderr


def test_busy_worker_is_one_line_not_a_hang(love):
    """A worker serves one client at a time: while another client holds it, the handshake times out."""
    import struct

    single = LocalWorkers(1)
    try:
        ep = single.endpoints[0]
        with socket.create_connection((ep.host, ep.port), timeout=10) as other:
            other.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))  # ggml-rpc HELLO, as any client
            assert len(other.recv(64)) > 0
            started = time.monotonic()
            result = cli("run", PROMPT, "--steer", str(love), "--rpc", single.spec, timeout=60)
            assert time.monotonic() - started < 30
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"the RPC worker at {ep} did not answer" in lines[0], result.stderr
    finally:
        single.stop()


def test_worker_on_a_taken_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("worker", "--port", str(port), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: cannot listen on 127.0.0.1:{port} (Address already in use): pick another --port or --host"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rpc", "nonsense"], "is not HOST:PORT"),
        (["--rpc", "[::1]:50052"], "takes no IPv6 literals"),
        (["--rpc", "127.0.0.1:99999"], "is not a number from 1 to 65535"),
        (["--rpc", "127.0.0.1:5,127.0.0.1:6", "--rpc-split", "1"], "give one per worker"),
        (["--rpc", "127.0.0.1:5", "--rpc-split", "a"], "is not a comma-separated list"),
        (["--rpc-split", "1,1"], "needs --rpc"),
    ],
)
def test_bad_rpc_values_are_refused_before_loading(args, message):
    result = cli("run", PROMPT, *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_worker_killed_mid_generation_exits_with_one_error_line(love):
    """The client must neither hang nor dump core: one Error line, exit 1, within seconds."""
    single = LocalWorkers(1)
    try:
        proc = subprocess.Popen(
            [*CLI, "run", "The history of the world, chapter one:", "--steer", str(love), "--temperature", "0",
             "--max-tokens", "3000", "--n-ctx", "4096", "--rpc", single.spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Kill the worker once generated text streams (the prompt echo comes with the first piece).
        first = threading.Event()
        out: list[bytes] = []

        def read() -> None:
            for chunk in iter(lambda: proc.stdout.read1(64), b""):
                out.append(chunk)
                first.set()

        threading.Thread(target=read, daemon=True).start()
        assert first.wait(120), "no text was generated"
        single.kill(0)
        killed = time.monotonic()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the client hung after its worker died")
        assert time.monotonic() - killed < 30
        stderr = proc.stderr.read().decode()
        assert rc == 1, stderr
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert errors == [errors[-1]] and errors[-1].startswith("Error: lost an RPC worker"), stderr
    finally:
        single.stop()


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str, timeout: float = 10) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_answers_5xx_when_a_worker_dies_and_serves_again_once_it_is_back(love, tmp_path):
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    (vectors / "love.gguf").write_bytes(love.read_bytes())
    single = LocalWorkers(1)
    try:
        with ServerProcess("--vectors", str(vectors), "--rpc", single.spec, "--threads", "2") as server:
            status, first = _post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                                   "steering": [{"vector": "love", "coeff": 5}]})
            assert status == 200, first
            results: list = []
            long_request = threading.Thread(
                target=lambda: results.append(
                    _post(server.url + "/v1/completions", {"prompt": "The history of the world, chapter one:",
                                                           "max_tokens": 1000, "temperature": 0})
                ),
                daemon=True,
            )
            long_request.start()
            deadline = time.monotonic() + 60
            while _get(server.url + "/health")[1]["queue"]["running"] == 0:
                assert time.monotonic() < deadline, "the long request never started"
                time.sleep(0.05)
            time.sleep(0.3)
            single.kill(0)
            long_request.join(60)
            assert not long_request.is_alive(), "the request in flight hung after its worker died"
            status, body = results[0]
            assert 500 <= status < 600 and "lost an RPC worker" in body["error"]["message"], body
            # The server keeps answering: unhealthy, and new requests get a JSON 503.
            status, health = _get(server.url + "/health")
            assert status == 503 and health["status"] == "unhealthy"
            status, body = _post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
            assert status == 503 and body["error"]["code"] == "backend_lost"
            assert server.alive()
            # The worker comes back on its port: the server restarts itself in place and
            # answers as before (connections made meanwhile wait in the listening backlog).
            single.restart(0)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if _get(server.url + "/health", timeout=60)[0] == 200:
                        break
                except OSError:  # a connection the old process accepted, closed by the restart
                    pass
                assert time.monotonic() < deadline, "the server did not come back:\n" + server.log
                time.sleep(0.5)
            status, again = _post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                                   "steering": [{"vector": "love", "coeff": 5}]})
            assert status == 200 and again["choices"][0]["text"] == first["choices"][0]["text"]
            assert server.alive()
    finally:
        single.stop()


def test_engine_copies_per_micro_batch_over_rpc(inprocess_rpc_workers):
    """On RPC buffers the engine reads the positions once per graph, then one read and one
    write per steered layer with rows in the micro-batch; past the span, only the positions."""
    import numpy as np

    from pyactadd.runtime import rpc
    from pyactadd.default_model import default_model_path
    from pyactadd.runtime.generate import load_llama
    from pyactadd.runtime.steering import Steering
    from pyactadd.vector.value import SteeringVector

    llama = load_llama(default_model_path(), n_ctx=256, n_threads=2, placement=rpc.Placement(tuple(inprocess_rpc_workers.endpoints)))
    steering = Steering.of(llama)
    fp = steering.fingerprint
    rng = np.random.default_rng(0)
    layers = [4, 8, 12, 16]
    vector = SteeringVector({L: rng.standard_normal((3, fp.n_embd)).astype(np.float32) for L in layers}, fingerprint=fp)
    ids = llama.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=True, special=True)
    steering.set([(vector, 1.0)], align="front")
    try:
        llama.reset()
        steering.reset_stats()
        llama.eval(ids)
        prefill = steering.stats()
        steering.reset_stats()
        for token in ids[:4]:
            llama.eval([token])
        generation = steering.stats()
    finally:
        steering.clear()
    assert prefill["n_layer_outputs_steered"] == len(layers) and prefill["n_rows_added"] == 3 * len(layers)
    assert prefill["n_device_copies"] == 1 + 2 * len(layers)
    assert generation["n_layer_outputs_steered"] == 0
    assert generation["n_device_copies"] == 4  # the positions of each one-token graph
