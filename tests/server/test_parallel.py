"""`pyactadd serve --parallel N`: concurrent requests in one continuous batch, each with its own steering.

Batched decoding is not bit-identical to one request at a time in llama.cpp, so each
response is checked token by token against its own steering alone (every token the solo
argmax within the measured numerics, helpers.scoring.SOLO_TOLERANCE) and shown to be far
from the argmax under the opposite steering: a row added to another request's tokens
would break one of the two. The completions are re-tokenized for that check, so the
settings are ones whose text re-tokenizes to the tokens generated (the usage count asserts it).
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from pyactadd.default_model import default_model_path
from pyactadd.extract.pipeline import extract
from pyactadd.runtime.generate import load_llama, prompt_tokens
from pyactadd.vector.value import SteeringVector
from helpers.scoring import SOLO_TOLERANCE, solo_gap
from helpers.server_launcher import ServerProcess, request

N_CTX = 256
PROMPT = "I hate you because"
# Eight steering settings (coefficients of one vector, a one-row vector at every position) and unsteered.
SETTINGS = [6.0, -6.0, 3.0, -3.0, None, ("row", 3.0), None, 6.0]


@pytest.fixture(scope="module")
def love() -> SteeringVector:
    return extract("Love", "Hate", [6], coeff=1.0)


@pytest.fixture(scope="module")
def love_row(love) -> SteeringVector:
    return SteeringVector(layers={6: love.layers[6][-1:].copy()}, fingerprint=love.fingerprint, alignment="all")


@pytest.fixture(scope="module")
def server(tmp_path_factory, love, love_row):
    folder = tmp_path_factory.mktemp("vectors")
    love.save(folder / "love.gguf")
    love_row.save(folder / "love_row.gguf")
    with ServerProcess("--vectors", str(folder), "--threads", "2", "--n-ctx", str(N_CTX), "--parallel", "4", "--queue-size", "8") as process:
        yield process


@pytest.fixture(scope="module")
def llama():
    return load_llama(default_model_path(), n_ctx=N_CTX, n_threads=2)


def body(setting, **extra) -> dict:
    payload = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "seed": 0, **extra}
    if isinstance(setting, tuple):
        payload["steering"] = [{"vector": "love_row", "coeff": setting[1]}]
    elif setting is not None:
        payload["steering"] = [{"vector": "love", "coeff": setting}]
    return payload


def items(setting, love, love_row) -> list:
    if setting is None:
        return []
    return [(love_row, setting[1])] if isinstance(setting, tuple) else [(love, setting)]


def health(server) -> dict:
    return request(server.url, "GET", "/health")[2]["queue"]


def test_health_reports_slots(server):
    queue = health(server)
    assert queue["slots"] == 4 and queue["slots_busy"] == 0


def test_concurrent_mixed_requests_each_follow_their_own_steering(server, llama, love, love_row):
    with ThreadPoolExecutor(len(SETTINGS)) as pool:
        answers = list(pool.map(lambda s: request(server.url, "POST", "/v1/completions", body(s)), SETTINGS))
    ids = prompt_tokens(llama, PROMPT)
    for setting, (status, _, payload) in zip(SETTINGS, answers):
        assert status == 200, payload
        text = payload["choices"][0]["text"]
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert payload["usage"]["completion_tokens"] == len(tokens)
        assert solo_gap(llama, ids, items(setting, love, love_row), tokens) <= SOLO_TOLERANCE, (setting, text)
        if isinstance(setting, float) and abs(setting) >= 6:  # weaker ones need not be told apart
            assert solo_gap(llama, ids, [(love, -setting)], tokens) > 3 * SOLO_TOLERANCE, (setting, text)
    texts = {payload["choices"][0]["text"] for _, _, payload in answers}
    assert len(texts) >= 5  # the settings really differ per request
    assert health(server)["slots_busy"] == 0


def test_bad_requests_still_get_4xx(server):
    status, _, payload = request(server.url, "POST", "/v1/completions", {"prompt": PROMPT, "steering": [{"vector": "nope", "coeff": 1}]})
    assert status in (400, 404) and "nope" in payload["error"]["message"]


def test_disconnect_frees_the_slot_at_once(server):
    parts = urlsplit(server.url)
    stream = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    long_body = json.dumps(body(6.0, max_tokens=200, stream=True))
    stream.request("POST", "/v1/completions", body=long_body, headers={"Content-Type": "application/json"})
    response = stream.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    assert health(server)["slots_busy"] == 1
    stream.close()
    deadline = time.monotonic() + 5
    while health(server)["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(server)["slots_busy"] == 0


def test_streamed_pieces_join_to_the_whole_text(server):
    whole = request(server.url, "POST", "/v1/completions", body(3.0))[2]["choices"][0]["text"]
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(body(3.0, stream=True)), headers={"Content-Type": "application/json"})
    pieces = []
    for line in connection.getresponse().read().decode().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            pieces += [choice["text"] for choice in chunk.get("choices", [])]
    connection.close()
    assert "".join(pieces) == whole
