"""pyactadd: Activation Addition (ActAdd) steering for llama.cpp models.

Pipeline: prompts → activations (PyTorch) → steering file (GGUF) → engine (C++, inside
llama.cpp) → tokens.

    import pyactadd
    vector = pyactadd.extract("Love", "Hate", layers=6)        # SteeringVector, [P, n_embd] per layer
    vector.save("love.gguf")
    llm = pyactadd.load_llama(pyactadd.default_model_path())
    with pyactadd.Steering.of(llm).steer([(vector, 5.0)]):
        print(llm.create_completion("I hate you because", max_tokens=20)["choices"][0]["text"])

Heavy modules (torch, transformers, llama_cpp) load on first use, so importing pyactadd
and running ``pyactadd --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from pyactadd.errors import EngineError, InputError, InstallError, ModelMismatchError, PyactaddError, SteeringFileError

# Even the vector names load on first use: `import pyactadd` then costs no numpy, so the
# CLI's Ctrl-C handling is in place before anything slow runs (pyactadd/cli/__init__.py).
_LAZY = {
    "ModelFingerprint": ("vector", "ModelFingerprint"),
    "SteeringVector": ("vector", "SteeringVector"),
    "check_layer": ("vector", "check_layer"),
    "from_llama_index": ("vector", "from_llama_index"),
    "to_llama_index": ("vector", "to_llama_index"),
    "extract": ("extract.pipeline", "extract"),
    "SinkRowWarning": ("extract.pipeline", "SinkRowWarning"),
    "Steering": ("runtime.steering", "Steering"),
    "load_llama": ("runtime.generate", "load_llama"),
    "Sampling": ("runtime.generate", "Sampling"),
    "run": ("runtime.generate", "run"),
    "Request": ("runtime.batch", "Request"),
    "Completion": ("runtime.batch", "Completion"),
    "Batcher": ("runtime.batch", "Batcher"),
    "generate_batch": ("runtime.batch", "generate_batch"),
    "default_model_path": ("default_model", "default_model_path"),
}

__all__ = [
    "EngineError",
    "InputError",
    "InstallError",
    "ModelMismatchError",
    "PyactaddError",
    "SteeringFileError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyactadd' has no attribute {name!r}")
