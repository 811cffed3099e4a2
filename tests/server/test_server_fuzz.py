"""Fuzzing `pyactadd serve` from its own OpenAPI schema with schemathesis.

A real server on 127.0.0.1 (a subprocess, the default model, ``--max-tokens 4`` so every
generation is short); schemathesis draws valid and invalid requests for each operation.
Every answer must be below 500, and every 4xx must be OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``; the server must still be alive at the
end. Bounded: a few examples per operation and no deadline, some seconds in all.
"""

from __future__ import annotations

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from helpers.server_launcher import ServerProcess
from pyactadd.vector.value import ModelFingerprint, SteeringVector

# SmolLM2-135M, the default model: a vector the fuzzer may name as "love".
FINGERPRINT = ModelFingerprint("llama", 576, 30, 49152)


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-vectors")
    rows = np.random.default_rng(0).standard_normal((2, FINGERPRINT.n_embd)).astype(np.float32) * 0.1
    SteeringVector(layers={6: rows}, fingerprint=FINGERPRINT).save(folder / "love.gguf")
    with ServerProcess(
        "--vectors", str(folder), "--threads", "1", "--n-ctx", "256", "--max-tokens", "4", "--queue-size", "4",
        "--max-vectors", "8", "--max-upload", "65536",
    ) as server:
        yield server
        assert server.alive(), server.log


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")


def openai_error_shape(ctx, response, case) -> None:
    """A 4xx answers OpenAI's error object, with a message."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert "Traceback" not in error["message"], error


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_every_4xx_is_an_openai_error(case, fuzzed_server):
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error, openai_error_shape])
    assert fuzzed_server.alive(), fuzzed_server.log
