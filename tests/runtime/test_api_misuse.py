"""The Python API misused as a careless caller would: every case runs in a subprocess that
must exit normally (return code 0) having caught pyactadd's typed error with the expected text.

Before pyactadd put its guard in front of the Llama, these segfaulted (``set``/``clear``
after ``close``), aborted in llama.cpp (``set`` or ``close`` from another thread during
generation) or raised bare TypeError/ValueError/AttributeError.
"""

from __future__ import annotations

import pytest
from helpers.misuse import run_alive

PRELUDE = """
import threading, numpy as np, pyactadd
from pyactadd.errors import EngineError, InputError
from pyactadd.vector.value import SteeringVector
llm = pyactadd.load_llama(pyactadd.default_model_path(), n_ctx=256, n_threads=1)
steering = pyactadd.Steering.of(llm)
fp = steering.fingerprint
row = SteeringVector(layers={6: np.ones((1, fp.n_embd), np.float32)}, fingerprint=fp, alignment="all")
front = SteeringVector(layers={6: np.ones((2, fp.n_embd), np.float32)}, fingerprint=fp, alignment="front")

def expect(kind, call):
    try:
        call()
    except kind as exc:
        print(f"{kind.__name__}: {exc}")
    else:
        print(f"no {kind.__name__} from {call}")

def streaming(started, out):
    try:
        for chunk in llm.create_completion("Once upon a time", max_tokens=120, stream=True, seed=0):
            started.set()
        out["finished"] = True
    except EngineError as exc:
        out["error"] = str(exc)
    finally:
        started.set()
"""

CLOSED = "EngineError: this Llama is closed: load the model again"

CASES = {
    "set after close": ("llm.close(); expect(EngineError, lambda: steering.set([(front, 1.0)]))", [CLOSED]),
    "clear with an all vector after close": (
        "steering.set([(row, 2.0)]); llm.close(); expect(EngineError, steering.clear)",
        [CLOSED],
    ),
    "every method after close": (
        """
        llm.close()
        llm.close()  # twice is fine
        for call in (steering.stats, steering.reset_stats, steering.check_errors,
                     lambda: steering.set_force_device_copy(False), lambda: pyactadd.Steering.of(llm),
                     lambda: llm.tokenize(b"hi"), lambda: llm.n_ctx(), lambda: llm.create_completion("hi", max_tokens=2),
                     lambda: pyactadd.run(llm, "hi", [], pyactadd.Sampling(max_tokens=2))):
            expect(EngineError, call)
        with_block = lambda: steering.steer([(front, 1.0)]).__enter__()
        expect(EngineError, with_block)
        """,
        [CLOSED] * 10,
    ),
    "close inside a steer block": (
        """
        with steering.steer([(front, 1.0)]):
            llm.close()
        print("left the block")
        """,
        ["left the block"],
    ),
    "set from another thread during generation": (
        """
        for attempt in range(3):
            started, out = threading.Event(), {}
            worker = threading.Thread(target=streaming, args=(started, out)); worker.start(); started.wait()
            refused = 0
            while worker.is_alive():
                try:
                    steering.set([(row, 1.0)]); steering.clear()
                except EngineError as exc:
                    refused += 1; message = str(exc)
            worker.join()
            print(f"attempt {attempt}: finished={out.get('finished')} refused={refused > 0}")
        print(message)
        """,
        [f"attempt {i}: finished=True refused=True" for i in range(3)]
        + ["steering cannot change while this Llama is generating: change it between completions"],
    ),
    "close from another thread during generation": (
        """
        started, out = threading.Event(), {}
        worker = threading.Thread(target=streaming, args=(started, out)); worker.start(); started.wait()
        llm.close(); worker.join()
        print("generation stopped:", out["error"])
        expect(EngineError, lambda: steering.set([(front, 1.0)]))
        """,
        ["generation stopped: this Llama is closed", CLOSED],
    ),
    "wrong argument types": (
        """
        expect(InputError, lambda: steering.set(5))
        expect(InputError, lambda: steering.set(["love"]))
        expect(InputError, lambda: steering.set([("love.gguf", 1.0)]))
        expect(InputError, lambda: steering.set([(front, "lots")]))
        expect(InputError, lambda: steering.set([(front, True)]))
        expect(InputError, lambda: steering.set([(front, 1.0)], align=2.5))
        expect(InputError, lambda: steering.set([(front, 1.0)], prompt_length="7"))
        expect(InputError, lambda: pyactadd.Steering.of("a model"))
        expect(InputError, lambda: pyactadd.load_llama(None))
        expect(InputError, lambda: pyactadd.load_llama(pyactadd.default_model_path(), n_ctx="512"))
        expect(InputError, lambda: pyactadd.load_llama(pyactadd.default_model_path(), n_ctx=1 << 40))
        expect(InputError, lambda: pyactadd.Sampling(max_tokens="30"))
        expect(InputError, lambda: pyactadd.run(llm, 42, [], pyactadd.Sampling(max_tokens=2)))
        expect(InputError, lambda: pyactadd.run(llm, "hi", [], {"max_tokens": 2}))
        expect(InputError, lambda: pyactadd.run(llm, "hi \\ud800", [], pyactadd.Sampling(max_tokens=2)))
        """,
        [
            "InputError: vectors must be a SteeringVector or a list of (vector, coeff[, align]) items, got int",
            "InputError: vectors[0] must be a (vector, coeff) or (vector, coeff, align) tuple, got str",
            "InputError: vectors[0][0] must be a SteeringVector, got str",
            "InputError: vectors[0][1] (the coefficient) must be a number, got str",
            "InputError: vectors[0][1] (the coefficient) must be a number, got bool",
            "InputError: unknown alignment 2.5",
            "InputError: prompt_length must be an integer, got str",
            "InputError: llama must be a llama_cpp.Llama",
            "InputError: model_path must be a path to a GGUF model file, got NoneType",
            "InputError: n_ctx must be an integer, got str",
            "InputError: n_ctx 1099511627776 needs about",  # refused before llama.cpp allocates 25 PB
            "InputError: max_tokens must be an integer, got str",
            "InputError: prompt must be a string, got int",
            "InputError: sampling must be a pyactadd.Sampling, got dict",
            "InputError: the prompt is not valid Unicode text: character 3 is a lone surrogate (U+D800)",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_misuse_raises_a_typed_error_and_the_process_lives(case):
    body, expected = CASES[case]
    lines = run_alive(PRELUDE, body, expected)
    assert not any(line.startswith("no ") for line in lines), lines
