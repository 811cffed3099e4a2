"""Text generation with llama.cpp (through llama-cpp-python), steered or not.

Loads the model once, builds the prompt tokens (chat template, anchor), and runs
completions with the same seed so a steered and an unsteered run differ only by the
steering.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from pyactadd.errors import InputError
from pyactadd.native import default_threads, llama_cpp_module
from pyactadd.prompts.chat import chat_ids, user_turn
from pyactadd.prompts.tokens import apply_anchor, check_utf8
from pyactadd.runtime.context_memory import context_memory_problem
from pyactadd.runtime.steering import Alignment, SteerItem, Steering, check_count, check_type, steer_items

if TYPE_CHECKING:
    from pyactadd.runtime.rpc import Placement


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by the steered and unsteered runs."""

    max_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = 0  # None: llama.cpp draws one

    def __post_init__(self) -> None:
        check_count(self.max_tokens, "max_tokens", 1)
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            check_type(value, numbers.Real, name, "a number")
            if not 0 <= value < float("inf"):
                raise InputError(f"{name} must be a finite number >= 0, got {value}")
        if self.seed is not None:
            check_count(self.seed, "seed")

    def as_dict(self) -> dict:
        """The settings as a plain dict (for JSON output)."""
        return asdict(self)


def load_llama(
    model_path: str | os.PathLike,
    *,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    n_batch: int = 512,
    placement: "Placement | None" = None,
):
    """Load a GGUF model into llama.cpp with a steering engine attached.

    ``placement`` puts the model's layers on llama.cpp RPC workers (``pyactadd worker``)
    instead of this process; steering works the same either way.

    Raises:
        InputError: an argument of the wrong type (named), the file is missing, a local
            context whose KV cache would not fit in free memory (checked before llama.cpp
            allocates it, see :mod:`pyactadd.runtime.context_memory`), llama.cpp cannot
            load the file, or a worker is not reachable.
    """
    check_type(model_path, (str, os.PathLike), "model_path", "a path to a GGUF model file")
    check_count(n_ctx, "n_ctx", 16)
    if n_threads is not None:
        check_count(n_threads, "n_threads", 1)
    check_count(n_batch, "n_batch", 1)
    lc = llama_cpp_module()
    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"no such model file: {path}")
    if placement is None:  # with placement the cache lives on the workers
        problem = context_memory_problem(path, n_ctx, "n_ctx")
        if problem:
            raise InputError(f"n_ctx {problem}")
    kwargs = dict(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=n_threads or default_threads(),
        verbose=False,
    )
    placed = contextlib.nullcontext({})
    if placement is not None:
        from pyactadd.runtime import rpc

        placed = rpc.placed(placement)
    try:
        with placed as extra:
            llama = lc.Llama(**kwargs, **extra)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"llama.cpp cannot load {path}: {exc}; is it a GGUF model file?") from None
    Steering.of(llama)
    return llama


def prompt_tokens(llama, prompt: str, *, chat: bool = False, anchor_id: int | None = None) -> list[int]:
    """The token ids llama.cpp evaluates for ``prompt`` (chat template and anchor applied).

    Raises:
        InputError: the prompt is not text, is empty, or holds a character UTF-8 cannot encode
            (a lone surrogate, as a non-UTF-8 argument or ``"\\ud800"`` in JSON decodes to).
    """
    check_type(prompt, str, "prompt", "a string")
    if not prompt.strip():
        raise InputError("empty prompt: give a non-empty text")
    check_utf8(prompt, "the prompt")
    if chat:
        return chat_ids(llama, user_turn(prompt), anchor_id=anchor_id)
    ids = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    return apply_anchor(ids, anchor_id)


def common_anchor(vectors: Sequence[SteerItem]) -> int | None:
    """The anchor token all ``vectors`` were extracted with (None when none uses one)."""
    anchors = {v.anchor_id for v, _, _ in steer_items(vectors) if v.anchor_id is not None}
    if len(anchors) > 1:
        raise InputError(f"the steering vectors use different anchor tokens {sorted(anchors)}: extract them with one --anchor")
    return anchors.pop() if anchors else None


def complete(llama, ids: Sequence[int], sampling: Sampling, *, on_text: Callable[[str], None] | None = None) -> str:
    """Generate a completion of the token ids with the steering currently set on ``llama``.

    ``on_text`` receives text pieces as they are generated (for streaming to a terminal).
    """
    check_type(sampling, Sampling, "sampling", "a pyactadd.Sampling")
    steering = Steering.of(llama)
    steering.reset_stats()
    if len(ids) + sampling.max_tokens > llama.n_ctx():
        raise InputError(
            f"prompt ({len(ids)} tokens) plus --max-tokens {sampling.max_tokens} exceeds the context of {llama.n_ctx()}: "
            "raise --n-ctx or lower --max-tokens"
        )
    kwargs = dict(
        prompt=list(ids),
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
    )
    if on_text is None:
        text = llama.create_completion(**kwargs)["choices"][0]["text"]
    else:
        pieces = []
        for chunk in llama.create_completion(stream=True, **kwargs):
            piece = chunk["choices"][0]["text"]
            pieces.append(piece)
            on_text(piece)
        text = "".join(pieces)
    steering.check_errors()
    return text


def run(
    llama,
    prompt: str,
    vectors: Sequence[SteerItem],
    sampling: Sampling,
    *,
    align: Alignment | None = None,
    chat: bool = False,
    compare: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> dict:
    """Run the steered completion (and the unsteered one first when ``compare``) of one prompt.

    ``vectors`` are ``(vector, coeff)`` or ``(vector, coeff, align)`` items, each placed by
    its own alignment (the item's, else the file's) unless ``align`` overrides them all.

    Returns a dict with ``prompt_tokens``, ``steered`` and, with ``compare``, ``unsteered``.

    Raises:
        InputError: an argument of the wrong type (named) or a bad prompt or vector.
        EngineError: the Llama is closed, or closed during the run.
    """
    check_type(sampling, Sampling, "sampling", "a pyactadd.Sampling")
    if on_text is not None and not callable(on_text):
        raise InputError(f"on_text must be a function of one string, got {type(on_text).__name__}")
    steering = Steering.of(llama)
    ids = prompt_tokens(llama, prompt, chat=chat, anchor_id=common_anchor(vectors))
    result: dict = {"prompt_tokens": ids}
    if compare:
        steering.clear()
        result["unsteered"] = complete(llama, ids, sampling)
    steering.set(list(vectors), align=align, prompt_length=len(ids))
    try:
        result["steered"] = complete(llama, ids, sampling, on_text=on_text)
    finally:
        if not steering.closed:
            steering.clear()
    return result
