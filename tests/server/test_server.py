"""`pyactadd serve` on loopback, driven by the official openai client and by raw HTTP.

A real server runs in a subprocess (127.0.0.1, a port the OS picks) on the default model;
its outputs are compared with `pyactadd run` and with `pyactadd.runtime.generate.run` on the same
settings and seed. Every wait is bounded; the servers stop at the end of the module.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.default_model import default_model_path
from pyactadd.extract.pipeline import extract
from pyactadd.runtime.generate import Sampling, load_llama, run
from helpers.server_launcher import ServerProcess, request
from pyactadd.server.schemas import param_of
from pyactadd.vector.value import ModelFingerprint, SteeringVector

THREADS = "1"  # the server and every reference run on one thread: same numerics, no oversubscription
N_CTX = 512
MAX_TOKENS_LIMIT = 256


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def love() -> SteeringVector:
    return extract("Love", "Hate", [6], coeff=1.0)


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory, love) -> Path:
    """love (per-position, front), love_row (one row, alignment all), other (another model's), garbage."""
    folder = tmp_path_factory.mktemp("vectors")
    love.save(folder / "love.gguf")
    SteeringVector(layers={6: love.layers[6][-1:].copy()}, fingerprint=love.fingerprint, alignment="all").save(folder / "love_row.gguf")
    rows = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    SteeringVector(layers={6: rows}, fingerprint=ModelFingerprint("llama", 64, 30, 49152)).save(folder / "other.gguf")
    (folder / "garbage.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 this is not a steering file")
    return folder


@pytest.fixture(scope="module")
def server(vectors_dir):
    with ServerProcess(
        "--vectors", str(vectors_dir), "--threads", THREADS, "--n-ctx", str(N_CTX),
        "--queue-size", "4", "--max-tokens", str(MAX_TOKENS_LIMIT),
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def llama():
    """The reference: the default model in this process, as `pyactadd run` loads it."""
    return load_llama(default_model_path(), n_ctx=N_CTX, n_threads=int(THREADS))


def steer(vector: str, coeff: float, align=None) -> dict:
    item = {"vector": vector, "coeff": coeff}
    if align is not None:
        item["align"] = align
    return {"steering": [item]}


def cli_run(*args: str) -> dict:
    result = CliRunner().invoke(main, ["run", *args, "--json", "--threads", THREADS, "--n-ctx", str(N_CTX)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["completions"]


def joined(stream, chat: bool = False) -> str:
    pieces = []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        pieces.append((choice.delta.content or "") if chat else choice.text)
    return "".join(pieces)


# --- listing ---------------------------------------------------------------------------


def test_health_models_and_vectors(server, client):
    status, _, health = request(server.url, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [default_model_path().name]

    status, _, listing = request(server.url, "GET", "/v1/steering/vectors")
    assert status == 200
    by_name = {v["id"]: v for v in listing["data"]}
    assert set(by_name) == {"love", "love_row", "other", "garbage"}
    assert by_name["love"]["usable"] and by_name["love"]["layers"] == [6] and by_name["love"]["positive"] == "Love"
    assert by_name["love_row"]["usable"] and by_name["love_row"]["alignment"] == "all"
    assert not by_name["other"]["usable"] and "n_embd 64" in by_name["other"]["error"]
    assert not by_name["garbage"]["usable"] and by_name["garbage"]["error"].startswith("garbage.gguf")


# --- equality with `pyactadd run` ----------------------------------------------------------


def test_completion_equals_pyactadd_run(client, vectors_dir):
    prompt, settings = "I hate you because", dict(max_tokens=16, temperature=0.8, top_p=0.95, seed=3)
    expected = cli_run(
        prompt, "--steer", f"{vectors_dir / 'love.gguf'}:5", "--compare",
        "--max-tokens", "16", "--temperature", "0.8", "--top-p", "0.95", "--seed", "3",
    )
    assert expected["steered"] != expected["unsteered"]

    steered = client.completions.create(model="any", prompt=prompt, extra_body=steer("love", 5), **settings)
    assert steered.choices[0].text == expected["steered"]
    assert steered.object == "text_completion" and steered.choices[0].finish_reason == "length"
    assert steered.usage.completion_tokens == 16
    assert steered.model_extra["steering"] == [{"vector": "love", "coeff": 5.0, "align": "front", "offset": 0}]

    unsteered = client.completions.create(model="any", prompt=prompt, **settings)
    assert unsteered.choices[0].text == expected["unsteered"]

    streamed = client.completions.create(model="any", prompt=prompt, stream=True, extra_body=steer("love", 5), **settings)
    assert joined(streamed) == expected["steered"]
    streamed = client.completions.create(model="any", prompt=prompt, stream=True, **settings)
    assert joined(streamed) == expected["unsteered"]


def test_chat_equals_pyactadd_run_chat(client, vectors_dir):
    prompt = "Tell me about your day"
    expected = cli_run(prompt, "--chat", "--steer", f"{vectors_dir / 'love.gguf'}:6", "--compare", "--max-tokens", "14", "--seed", "5")
    assert expected["steered"] != expected["unsteered"]
    messages = [{"role": "user", "content": prompt}]
    settings = dict(max_tokens=14, temperature=0.7, top_p=0.95, seed=5)

    reply = client.chat.completions.create(model="any", messages=messages, extra_body=steer("love", 6), **settings)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["steered"]
    plain = client.chat.completions.create(model="any", messages=messages, **settings)
    assert plain.choices[0].message.content == expected["unsteered"]

    stream = client.chat.completions.create(model="any", messages=messages, stream=True, extra_body=steer("love", 6), **settings)
    assert joined(stream, chat=True) == expected["steered"]
    stream = client.chat.completions.create(model="any", messages=messages, stream=True, **settings)
    assert joined(stream, chat=True) == expected["unsteered"]


@pytest.mark.parametrize(
    ("vector", "coeff", "align"),
    [("love", 4.0, "back"), ("love", 4.0, 2), ("love_row", 3.0, "all"), ("love_row", 3.0, None)],
)
def test_alignments_equal_generate_run(client, llama, vectors_dir, vector, coeff, align):
    loaded = SteeringVector.load(vectors_dir / f"{vector}.gguf")
    sampling = Sampling(max_tokens=8, temperature=0.8, top_p=0.95, seed=9)
    prompt = "I think that you are"
    expected = run(llama, prompt, [(loaded, coeff)], sampling, align=align)["steered"]
    got = client.completions.create(
        model="any", prompt=prompt, max_tokens=8, temperature=0.8, top_p=0.95, seed=9, extra_body=steer(vector, coeff, align)
    )
    assert got.choices[0].text == expected


def test_mixed_alignments_and_multi_turn_chat(server, client):
    both = {"steering": [{"vector": "love", "coeff": 3, "align": "front"}, {"vector": "love", "coeff": 3, "align": 2}]}
    mixed = client.completions.create(model="any", prompt="I hate you because", max_tokens=6, seed=1, extra_body=both)
    assert [s["offset"] for s in mixed.model_extra["steering"]] == [0, 2]
    assert mixed.choices[0].text

    status, _, error = request(
        server.url, "POST", "/v1/completions",
        {"prompt": "I hate you", "steering": [{"vector": "love_row", "align": "all"}, {"vector": "love", "align": "front"}]},
    )
    assert status == 400 and error["error"]["param"] == "steering[1].align"

    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": [{"type": "text", "text": "Another one?"}]},
    ]
    reply = client.chat.completions.create(model="any", messages=messages, max_tokens=8, seed=2, extra_body=steer("love", 2))
    assert reply.choices[0].message.content is not None
    assert reply.usage.prompt_tokens > 20

    stopped = client.completions.create(model="any", prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[" 7"])
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_run_mixes_stored_alignments_as_the_server_does(server, client, vectors_dir, love, tmp_path):
    """`pyactadd run --steer a.gguf:5 --steer b.gguf:3` with files of different stored
    alignments generates what the server generates for the same mix (greedy, same seed),
    and `--align` overrides every file as a request's align on every item does."""
    back_file = tmp_path / "love_back.gguf"
    SteeringVector(layers=love.layers, fingerprint=love.fingerprint, alignment="back").save(back_file)
    status, _, _ = request(
        server.url, "PUT", "/v1/steering/vectors/love_back", back_file.read_bytes(), {"Content-Type": "application/octet-stream"}
    )
    assert status == 201
    prompt, settings = "I hate you because", dict(max_tokens=10, temperature=0.0, seed=4)
    flags = ["--max-tokens", "10", "--temperature", "0", "--seed", "4"]
    files = ["--steer", f"{vectors_dir / 'love.gguf'}:5", "--steer", f"{back_file}:3"]
    try:
        expected = cli_run(prompt, *files, "--compare", *flags)
        assert expected["steered"] != expected["unsteered"]
        mix = {"steering": [{"vector": "love", "coeff": 5}, {"vector": "love_back", "coeff": 3}]}
        got = client.completions.create(model="any", prompt=prompt, extra_body=mix, **settings)
        assert [s["align"] for s in got.model_extra["steering"]] == ["front", "back"]
        assert got.choices[0].text == expected["steered"]

        overridden = cli_run(prompt, *files, "--align", "1", *flags)["steered"]
        both = {"steering": [{"vector": "love", "coeff": 5, "align": 1}, {"vector": "love_back", "coeff": 3, "align": 1}]}
        got = client.completions.create(model="any", prompt=prompt, extra_body=both, **settings)
        assert [s["offset"] for s in got.model_extra["steering"]] == [1, 1]
        assert got.choices[0].text == overridden
    finally:
        request(server.url, "DELETE", "/v1/steering/vectors/love_back")


def test_sse_wire_format(server):
    for path, body, kind in (
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "seed": 0, "stream": True, **steer("love", 2)}, "text_completion"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 0, "stream": True,
                                  "stream_options": {"include_usage": True}}, "chat.completion.chunk"),
    ):
        status, headers, raw = request(server.url, "POST", path, body)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        events = [block for block in raw.decode().split("\n\n") if block]
        assert all(block.startswith("data: ") for block in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(block[6:]) for block in events[:-1]]
        assert {c["object"] for c in chunks} == {kind}
        assert len({c["id"] for c in chunks}) == 1
        with_choices = [c for c in chunks if c["choices"]]
        assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        if kind == "chat.completion.chunk":
            assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


# --- bad input ---------------------------------------------------------------------------

BAD = [
    ("unknown vector", {"prompt": "Hi", **steer("nope", 1)}, 400, "steering[0].vector", "unknown_vector"),
    ("relative path", {"prompt": "Hi", **steer("../vectors/love.gguf", 1)}, 400, "steering[0].vector", None),
    ("absolute path", {"prompt": "Hi", **steer("/etc/passwd", 1)}, 400, "steering[0].vector", None),
    ("file name", {"prompt": "Hi", **steer("love.gguf", 1)}, 400, "steering[0].vector", "unknown_vector"),
    ("another model's vector", {"prompt": "Hi", **steer("other", 1)}, 400, "steering[0].vector", "model_mismatch"),
    ("broken vector file", {"prompt": "Hi", **steer("garbage", 1)}, 400, "steering[0].vector", "unusable_vector"),
    ("negative max_tokens", {"prompt": "Hi", "max_tokens": -5}, 400, "max_tokens", None),
    ("max_tokens over limit", {"prompt": "Hi", "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens", "max_tokens_too_large"),
    ("max_tokens over context", {"prompt": "Hi " * 300, "max_tokens": 250}, 400, "max_tokens", "context_length_exceeded"),
    ("prompt over context", {"prompt": "Hi " * 700, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ("empty prompt", {"prompt": "   "}, 400, "prompt", None),
    ("missing prompt", {"max_tokens": 3}, 400, "prompt", None),
    ("unknown steering field", {"prompt": "Hi", "steering": [{"vector": "love", "coef": 2}]}, 400, "steering[0].coef", None),
    ("bad alignment", {"prompt": "Hi", **steer("love", 1, "sideways")}, 400, "steering[0].align", None),
    ("negative offset", {"prompt": "Hi", **steer("love", 1, -2)}, 400, "steering[0].align", None),
    ("back on a short prompt", {"prompt": "Hi", **steer("love", 1, "back")}, 400, "steering[0].align", "invalid_alignment"),
    ("all on a per-position vector", {"prompt": "Hi there", **steer("love", 1, "all")}, 400, "steering[0].align", None),
    ("coeff not a number", {"prompt": "Hi", "steering": [{"vector": "love", "coeff": "lots"}]}, 400, "steering[0].coeff", None),
    ("steering not a list", {"prompt": "Hi", "steering": "love"}, 400, "steering", None),
    ("n > 1", {"prompt": "Hi", "n": 2}, 400, "n", None),
    ("temperature out of range", {"prompt": "Hi", "temperature": 9}, 400, "temperature", None),
    ("logprobs", {"prompt": "Hi", "logprobs": 3}, 400, "logprobs", None),
    ("misspelt steering", {"prompt": "Hi", "steer": [{"vector": "love"}]}, 400, "steer", "unknown_field"),
    ("body not an object", [1, 2], 400, None, None),
]


@pytest.mark.parametrize(("case", "body", "status", "param", "code"), BAD, ids=[case[0] for case in BAD])
def test_bad_field_gets_4xx_naming_it(server, case, body, status, param, code):
    got, _, payload = request(server.url, "POST", "/v1/completions", body)
    assert got == status, payload
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
    if code:
        assert error["code"] == code, error


def test_bad_chat_fields(server):
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ]
    for body, param in cases:
        status, _, payload = request(server.url, "POST", "/v1/chat/completions", body)
        assert status == 400 and payload["error"]["param"] == param, payload


def test_malformed_bodies(server):
    status, _, payload = request(server.url, "POST", "/v1/completions", b'{"prompt": "Hi", ')
    assert status == 400 and payload["error"]["code"] == "invalid_json"
    status, _, payload = request(server.url, "POST", "/v1/completions", b'{"prompt": "Hi"}', headers={"Content-Type": "text/plain"})
    assert status == 400 and payload["error"]["code"] == "invalid_content_type"
    status, _, payload = request(server.url, "POST", "/v1/completions", b"")
    assert status == 400 and "empty" in payload["error"]["message"]
    oversize = json.dumps({"prompt": "a" * (2 << 20)}).encode()
    status, _, payload = request(server.url, "POST", "/v1/completions", oversize)
    assert status == 413 and payload["error"]["code"] == "body_too_large"
    status, _, payload = request(server.url, "GET", "/v1/nothing-here")
    assert status == 404 and payload["error"]["message"]
    status, _, payload = request(server.url, "GET", "/health", headers={"Host": "attacker.example"})
    assert status == 421

    # Still serving.
    status, _, health = request(server.url, "GET", "/health")
    assert status == 200
    status, _, ok = request(server.url, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, **steer("love", 1)})
    assert status == 200 and ok["choices"][0]["text"]


def test_param_names():
    assert param_of(("body", "steering", 0, "coeff")) == "steering[0].coeff"
    assert param_of(("body", "prompt", "list[str]", 1)) == "prompt"
    assert param_of(("body",)) is None


# --- uploads -------------------------------------------------------------------------------


def test_upload_use_and_delete(server, client, vectors_dir, llama, love):
    data = (vectors_dir / "love.gguf").read_bytes()
    status, _, entry = request(server.url, "PUT", "/v1/steering/vectors/uploaded", data, {"Content-Type": "application/octet-stream"})
    assert status == 201 and entry["usable"] and entry["origin"] == "upload" and entry["layers"] == [6]

    sampling = Sampling(max_tokens=6, temperature=0.8, top_p=0.95, seed=4)
    expected = run(llama, "I hate you because", [(love, 2.0)], sampling)["steered"]
    got = client.completions.create(
        model="x", prompt="I hate you because", max_tokens=6, temperature=0.8, top_p=0.95, seed=4, extra_body=steer("uploaded", 2)
    )
    assert got.choices[0].text == expected

    status, _, error = request(server.url, "PUT", "/v1/steering/vectors/other2", (vectors_dir / "other.gguf").read_bytes())
    assert status == 400 and error["error"]["code"] == "model_mismatch"
    status, _, error = request(server.url, "PUT", "/v1/steering/vectors/junk", b"not a gguf file at all")
    assert status == 400 and error["error"]["code"] == "invalid_vector_file"
    status, _, error = request(server.url, "PUT", "/v1/steering/vectors/..", data)
    assert status in (400, 404)
    _, _, listing = request(server.url, "GET", "/v1/steering/vectors")
    assert {"other2", "junk"}.isdisjoint(v["id"] for v in listing["data"])

    status, _, _ = request(server.url, "DELETE", "/v1/steering/vectors/uploaded")
    assert status == 204
    status, _, error = request(server.url, "POST", "/v1/completions", {"prompt": "Hi", **steer("uploaded", 1)})
    assert status == 400 and error["error"]["code"] == "unknown_vector"


# --- isolation under load --------------------------------------------------------------------


def test_isolation_under_load(server, client, llama, love):
    """8 clients, 100 requests mixing steered and unsteered: each equals its own reference."""
    prompts = ["I hate you because", "The weather today is"]
    steerings = [None, ("love", 5.0, None), ("love", -4.0, 1)]
    kinds = [(p, s) for p in prompts for s in steerings]
    sampling = Sampling(max_tokens=4, temperature=0.8, top_p=0.95, seed=11)
    references = {}
    for prompt, steering in kinds:
        vectors = [] if steering is None else [(love, steering[1])]
        result = run(llama, prompt, vectors, sampling, align=None if steering is None else steering[2])
        references[(prompt, steering)] = result["steered"]
    for prompt in prompts:
        assert len({references[(prompt, s)] for s in steerings}) == 3, "every steering must change the text"

    rng = random.Random(0)
    jobs = [(i, kinds[rng.randrange(len(kinds))], i % 3 == 0) for i in range(100)]
    lock = threading.Lock()
    results: dict[int, str] = {}
    failures: list[str] = []
    busy = {"503": 0, "missing_retry_after": 0}

    def once(kind, stream):
        prompt, steering = kind
        extra = {} if steering is None else steer(steering[0], steering[1], steering[2])
        args = dict(model="any", prompt=prompt, max_tokens=4, temperature=0.8, top_p=0.95, seed=11, extra_body=extra)
        if stream:
            return joined(client.completions.create(stream=True, **args))
        return client.completions.create(**args).choices[0].text

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                index, kind, stream = jobs.pop()
            deadline = time.monotonic() + 300
            while True:
                try:
                    text = once(kind, stream)
                    break
                except openai.APIStatusError as exc:
                    if exc.status_code != 503 or time.monotonic() > deadline:
                        with lock:
                            failures.append(f"request {index}: {exc.status_code} {exc.message}")
                        text = None
                        break
                    retry_after = exc.response.headers.get("retry-after", "")
                    with lock:
                        busy["503"] += 1
                        if not retry_after.isdigit():
                            busy["missing_retry_after"] += 1
                    # Back off as told, capped so the test keeps the queue busy.
                    time.sleep(min(float(retry_after or 1), 1.5) * (0.5 + rng.random() / 2))
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    with lock:
                        failures.append(f"request {index}: {exc!r}")
                    text = None
                    break
            with lock:
                results[index] = (kind, text)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not any(thread.is_alive() for thread in threads), "load test did not finish"
    assert not failures, failures[:5]
    assert len(results) == 100
    wrong = [(i, kind, text) for i, (kind, text) in results.items() if text != references[kind]]
    assert not wrong, wrong[:5]
    assert busy["missing_retry_after"] == 0
    status, _, health = request(server.url, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["queue"]["failed"] == 0
    print(f"503 answers while the queue was full: {busy['503']}")


# --- API key, full queue, cancellation (a second server) --------------------------------------


@pytest.fixture(scope="module")
def strict_server(vectors_dir):
    with ServerProcess(
        "--vectors", str(vectors_dir), "--threads", THREADS, "--n-ctx", str(N_CTX), "--queue-size", "1",
        "--api-key", "s3cret", "--no-upload",
    ) as process:
        yield process


def test_api_key(strict_server):
    url = strict_server.url
    body = {"prompt": "Hello", "max_tokens": 2}
    assert request(url, "POST", "/v1/completions", body)[0] == 401
    status, headers, payload = request(url, "POST", "/v1/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401 and payload["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    assert request(url, "GET", "/v1/steering/vectors")[0] == 401
    assert request(url, "GET", "/health")[0] == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
    assert client.completions.create(model="x", prompt="Hello", max_tokens=2, extra_body=steer("love", 1)).choices[0].text
    status, _, payload = request(url, "PUT", "/v1/steering/vectors/x", b"data", {"Authorization": "Bearer s3cret"})
    assert status == 403 and payload["error"]["code"] == "upload_disabled"


def test_full_queue_answers_503_and_disconnect_cancels(strict_server):
    url = strict_server.url
    auth = {"Authorization": "Bearer s3cret"}
    parts = urlsplit(url)

    def health() -> dict:
        return request(url, "GET", "/health")[2]["queue"]

    before = health()
    # A long streaming request: read its first event, so it is running.
    long_body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "seed": 0, **steer("love", 2)})
    stream = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    stream.request("POST", "/v1/completions", body=long_body, headers={"Content-Type": "application/json", **auth})
    response = stream.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")

    # A second request waits in the queue (size 1) ...
    queued: dict = {}
    waiter = threading.Thread(
        target=lambda: queued.update(result=request(url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, auth))
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while health()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health()["waiting"] == 1

    # ... so a third is refused at once with 503 and Retry-After.
    started = time.monotonic()
    status, headers, payload = request(url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, auth)
    assert status == 503 and payload["error"]["code"] == "server_busy"
    assert int(headers["retry-after"]) >= 1
    assert time.monotonic() - started < 5

    # Hanging up on the stream cancels its generation: the queued request runs soon after.
    stream.close()
    waiter.join(60)
    assert not waiter.is_alive(), "the queued request did not run after the stream was cancelled"
    assert queued["result"][0] == 200
    after = health()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["rejected"] == before["rejected"] + 1
    assert after["running"] == 0 and after["waiting"] == 0


def test_listen_reports_the_port_and_refuses_a_busy_one():
    from pyactadd.errors import InputError
    from pyactadd.server import process

    with process.listen("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        assert process.url_of(sock) == f"http://127.0.0.1:{port}"
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
            process.listen("127.0.0.1", port).close()
        inherited = process.listen("ignored", 0, fd=sock.fileno())
        assert inherited.getsockname() == sock.getsockname()
        inherited.detach()  # the fd stays sock's
