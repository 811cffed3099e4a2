"""`pyactadd serve`'s bounds and input edges: the API key before the body, lone surrogates,
JSON true as an alignment, the registry's limits, the per-request steering limit, and no
server path in any message. A real server on 127.0.0.1 in a subprocess, on the default model.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.server_launcher import ServerProcess, request
from pyactadd.runtime.generate import load_llama
from pyactadd.default_model import default_model_path
from pyactadd.runtime.steering import model_fingerprint
from pyactadd.vector.value import SteeringVector


KEY = {"Authorization": "Bearer k3y"}
N_EMBD_BYTES = 576 * 4  # one row of the default model (SmolLM2-135M, n_embd 576), float32


@pytest.fixture(scope="module")
def fingerprint():
    llama = load_llama(default_model_path(), n_ctx=64, n_threads=1)
    try:
        return model_fingerprint(llama)
    finally:
        llama.close()


def vector_file(fingerprint, folder, name: str, rows: int, alignment: str = "front") -> bytes:
    values = np.random.default_rng(rows).standard_normal((rows, fingerprint.n_embd)).astype(np.float32) * 0.01
    path = folder / f"{name}.gguf"
    SteeringVector(layers={6: values}, fingerprint=fingerprint, alignment=alignment).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fingerprint):
    folder = tmp_path_factory.mktemp("limits")
    vector_file(fingerprint, folder, "small", 2)  # 2 rows: 4,608 bytes
    return folder


@pytest.fixture(scope="module")
def server(folder):
    # Room for 3 vectors and 10 rows in all: small (2 rows) leaves 8.
    with ServerProcess(
        "--vectors", str(folder), "--threads", "1", "--n-ctx", "256", "--api-key", "k3y",
        "--max-vectors", "3", "--max-vector-bytes", str(10 * N_EMBD_BYTES),
    ) as process:
        yield process


def test_key_is_checked_before_the_body(server):
    for body in (b'{"prompt": ', b"", b"[1, 2]"):
        status, headers, payload = request(server.url, "POST", "/v1/completions", body)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key", payload
        assert headers["www-authenticate"] == "Bearer"
    status, _, payload = request(server.url, "PUT", "/v1/steering/vectors/x", b"junk" * 1000)
    assert status == 401
    status, _, payload = request(server.url, "POST", "/v1/completions", b'{"prompt": ', KEY)
    assert status == 400 and payload["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", b'{"prompt": ["hi \\udfff"], "max_tokens": 2}', "prompt"),
        ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800", "max_tokens": 2}', "stop"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            "messages[0].content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    status, _, payload = request(server.url, "POST", path, body, KEY)
    assert status == 400, payload
    assert payload["error"]["param"] == param and "lone surrogate" in payload["error"]["message"], payload


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "steering": [{"vector": "small", "align": True}]}, "steering[0].align"),
        ({"prompt": "Hi", "steering": [{"vector": "small", "coeff": True}]}, "steering[0].coeff"),
        ({"prompt": "Hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "Hi", "seed": False}, "seed"),
    ],
)
def test_json_true_is_not_a_number(server, body, param):
    status, _, payload = request(server.url, "POST", "/v1/completions", body, KEY)
    assert status == 400 and payload["error"]["param"] == param, payload


def test_registry_limits_and_no_server_path(server, folder, fingerprint, tmp_path):
    url = server.url
    six = vector_file(fingerprint, tmp_path, "six", 6)
    status, _, entry = request(url, "PUT", "/v1/steering/vectors/six", six, KEY)
    assert status == 201 and entry["bytes"] == 6 * N_EMBD_BYTES
    # 2 + 6 rows held: 3 more rows would pass the byte limit.
    status, _, payload = request(url, "PUT", "/v1/steering/vectors/three", vector_file(fingerprint, tmp_path, "three", 3), KEY)
    assert status == 413 and payload["error"]["code"] == "vectors_too_large", payload
    assert "--max-vector-bytes" in payload["error"]["message"]
    # Replacing "six" by a smaller vector frees its room.
    status, _, _ = request(url, "PUT", "/v1/steering/vectors/six", vector_file(fingerprint, tmp_path, "one", 1), KEY)
    assert status == 201
    status, _, _ = request(url, "PUT", "/v1/steering/vectors/one", vector_file(fingerprint, tmp_path, "one", 1), KEY)
    assert status == 201
    # Three vectors registered: a fourth is refused by count, before its bytes are read.
    status, _, payload = request(url, "PUT", "/v1/steering/vectors/four", b"not even a gguf", KEY)
    assert status == 409 and payload["error"]["code"] == "too_many_vectors", payload
    status, _, _ = request(url, "DELETE", "/v1/steering/vectors/one", None, KEY)
    assert status == 204

    # A broken upload names the upload, never where the server read it from.
    status, _, payload = request(url, "PUT", "/v1/steering/vectors/junk", b"GGUF\x03\x00\x00\x00 truncated", KEY)
    assert status == 400 and payload["error"]["code"] == "invalid_vector_file"
    message = payload["error"]["message"]
    assert "the upload 'junk'" in message and "/proc/" not in message and "/tmp" not in message, message
    _, _, listing = request(url, "GET", "/v1/steering/vectors", None, KEY)
    assert str(folder) not in str(listing)


def test_a_request_naming_more_than_the_byte_limit_is_refused(server):
    # small (2 rows) named 6 times: 12 rows, above the limit of 10; 5 times is within it.
    many = {"prompt": "Hello there", "max_tokens": 2, "steering": [{"vector": "small", "coeff": 0.1, "align": i} for i in range(6)]}
    status, _, payload = request(server.url, "POST", "/v1/completions", many, KEY)
    assert status == 400 and payload["error"]["param"] == "steering" and payload["error"]["code"] == "steering_too_large"
    many["steering"] = many["steering"][:5]
    status, _, payload = request(server.url, "POST", "/v1/completions", many, KEY)
    assert status == 200, payload
    assert server.alive()
