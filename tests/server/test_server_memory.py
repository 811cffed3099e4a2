"""The server's memory under the worst request its limits allow: `benchmarks/serve_memory.py`
run small (a real server on 127.0.0.1; Linux only, it reads /proc)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_memory.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's peak memory from /proc")
def test_worst_allowed_request_costs_at_most_twice_what_it_names():
    spec = importlib.util.spec_from_file_location("serve_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.measure(rows=128)
    print(result)
    assert result["alive"]
    assert result["named_bytes"] == 16 * result["vector_bytes"]
    assert result["ratio_to_named"] <= 2, result
    assert result["over_limit_status"] == 400
