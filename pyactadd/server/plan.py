"""From a validated request to what the worker runs: prompt token ids, steering, sampling.

The prompt and the steering go through the very functions ``pyactadd run`` uses
(:func:`pyactadd.runtime.generate.prompt_tokens` with the vectors' :func:`common_anchor`, and
later :meth:`Steering.set` with the prompt length), so a request generates exactly what
``pyactadd run`` generates with the same settings and seed.

Every check that does not need the model's time happens here, in the request handler,
so a bad request is answered at once with a 400 naming the field instead of waiting in
the queue.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pyactadd.errors import InputError
from pyactadd.runtime.generate import Sampling, common_anchor, prompt_tokens
from pyactadd.runtime.steering import Alignment, Steering
from pyactadd.prompts.tokens import apply_anchor
from pyactadd.vector.value import SteeringVector
from pyactadd.server.registry import VectorRegistry
from pyactadd.server.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SteeringItem,
)


@dataclass(frozen=True)
class SteeringPlan:
    """The steering one request asks for, ready for :meth:`Steering.set`.

    ``key`` identifies the steering in force exactly: each vector's registration, its
    coefficient and the position of its first row (``None`` for ``all``). Two requests
    with equal keys steer identically; the worker resets the KV cache whenever it changes.
    """

    vectors: tuple[tuple[SteeringVector, float], ...]
    align: Alignment | None
    key: tuple
    described: tuple[dict[str, Any], ...]  # echoed in the response

    @property
    def steered(self) -> bool:
        return bool(self.vectors)


UNSTEERED = SteeringPlan((), None, (), ())


@dataclass(frozen=True)
class Prepared:
    """One request, ready for the worker."""

    ids: list[int]
    plan: SteeringPlan
    sampling: Sampling
    stop: list[str] | None
    penalties: dict[str, float]


def prepare(
    llama,
    registry: VectorRegistry,
    request: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens_limit: int,
) -> Prepared:
    """Check ``request`` against the model and the registry and build what the worker runs.

    Raises:
        ApiError: 400 naming the field at fault.
    """
    chat = isinstance(request, ChatCompletionRequest)
    prompt_field = "messages" if chat else "prompt"
    for key in request.model_extra or {}:
        if "steer" in key.lower():
            raise ApiError(400, f"unknown field {key!r}: did you mean 'steering'?", param=key, code="unknown_field")
    entries = _entries(registry, request.steering)
    vectors = [(entry.vector, item.coeff) for entry, item in zip(entries, request.steering)]
    try:
        anchor = common_anchor(vectors)
    except InputError as exc:
        raise ApiError(400, str(exc), param="steering", code="incompatible_vectors") from None
    try:
        ids = chat_tokens(llama, request.messages, anchor) if chat else prompt_tokens(llama, request.prompt, anchor_id=anchor)
    except InputError as exc:
        raise ApiError(400, str(exc), param=prompt_field, code="invalid_prompt") from None

    n_ctx = int(llama.n_ctx())
    room = n_ctx - len(ids)
    if room < 1:
        raise ApiError(
            400,
            f"the {prompt_field} is {len(ids)} tokens, which leaves no room in the context of {n_ctx} tokens: shorten it",
            param=prompt_field,
            code="context_length_exceeded",
        )
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = min(max_tokens_limit, room) if chat else min(DEFAULT_COMPLETION_MAX_TOKENS, max_tokens_limit, room)
    elif max_tokens > max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} is above this server's limit of {max_tokens_limit}",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    elif max_tokens > room:
        raise ApiError(
            400,
            f"the {prompt_field} ({len(ids)} tokens) plus max_tokens {max_tokens} exceeds the context of {n_ctx} tokens: "
            f"lower max_tokens to at most {room} or shorten the {prompt_field}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    plan = steering_plan(entries, request.steering, prompt_length=len(ids), n_ctx=n_ctx)
    sampling = Sampling(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p, seed=request.seed)
    penalties = {
        name: value
        for name, value in (("frequency_penalty", request.frequency_penalty), ("presence_penalty", request.presence_penalty))
        if value
    }
    return Prepared(ids=ids, plan=plan, sampling=sampling, stop=request.stop, penalties=penalties)


def _entries(registry: VectorRegistry, items: Sequence[SteeringItem]):
    entries = []
    for index, item in enumerate(items):
        param = f"steering[{index}].vector"
        entry = registry.get(item.vector)
        if entry is None:
            known = ", ".join(e.name for e in registry.entries() if e.usable) or "none loaded"
            raise ApiError(
                400,
                f"unknown steering vector {item.vector!r} (available: {known}; GET /v1/steering/vectors lists them)",
                param=param,
                code="unknown_vector",
            )
        if not entry.usable:
            code = "model_mismatch" if entry.vector is not None else "unusable_vector"
            raise ApiError(400, f"steering vector {item.vector!r} cannot be used: {entry.problem}", param=param, code=code)
        entries.append(entry)
    return entries


def steering_plan(entries, items: Sequence[SteeringItem], *, prompt_length: int, n_ctx: int) -> SteeringPlan:
    """Resolve each item's alignment to positions and build the plan.

    When every item has the same alignment the vectors go to :meth:`Steering.set` as they
    are, with that alignment, exactly as ``pyactadd run --align`` passes them. Different
    per-position alignments in one request are resolved to offsets and the later-starting
    vectors are padded at the front with zero rows (adding zero changes nothing), so one
    ``set`` call places each vector where its own alignment says.

    Raises:
        ApiError: an alignment the vector cannot take, or a span outside the context.
    """
    if not items:
        return UNSTEERED
    aligns: list[Alignment] = [item.align if item.align is not None else entry.vector.alignment for entry, item in zip(entries, items)]
    offsets: list[int | None] = []
    for index, (entry, align) in enumerate(zip(entries, aligns)):
        try:
            offsets.append(Steering.first_position(entry.vector, align, prompt_length, n_ctx))
        except InputError as exc:
            raise ApiError(400, str(exc), param=f"steering[{index}].align", code="invalid_alignment") from None
    key = tuple((entry.uid, float(item.coeff), offset) for entry, item, offset in zip(entries, items, offsets))
    described = tuple(
        {"vector": entry.name, "coeff": item.coeff, "align": align, "offset": offset}
        for entry, item, align, offset in zip(entries, items, aligns, offsets)
    )
    vectors = [(entry.vector, float(item.coeff)) for entry, item in zip(entries, items)]
    if len(set(aligns)) == 1:
        return SteeringPlan(tuple(vectors), aligns[0], key, described)
    if "all" in aligns:
        index = next(i for i, a in enumerate(aligns) if a != aligns[0])
        raise ApiError(
            400,
            "alignment 'all' cannot be combined with per-position alignments in one request: "
            "give every vector 'all', or none",
            param=f"steering[{index}].align",
            code="invalid_alignment",
        )
    start = min(o for o in offsets if o is not None)
    padded = tuple((_pad_front(vector, offset - start), coeff) for (vector, coeff), offset in zip(vectors, offsets))
    return SteeringPlan(padded, start, key, described)


def _pad_front(vector: SteeringVector, n_rows: int) -> SteeringVector:
    if n_rows == 0:
        return vector
    zeros = np.zeros((n_rows, vector.n_embd), dtype=np.float32)
    layers = {layer: np.concatenate([zeros, rows]) for layer, rows in vector.layers.items()}
    return dataclasses.replace(vector, layers=layers, alignment="front", extra=dict(vector.extra))


def chat_tokens(llama, messages: Sequence[ChatMessage], anchor_id: int | None) -> list[int]:
    """Token ids of a chat in the model's template.

    A single user message goes through :func:`prompt_tokens` with ``chat=True``, exactly
    as ``pyactadd run --chat``; a longer conversation is rendered by the same formatter
    (:class:`llama_cpp.llama_chat_format.Jinja2ChatFormatter` on the GGUF's template).

    Raises:
        InputError: an empty message, or a model without a chat template.
    """
    if len(messages) == 1 and messages[0].role == "user":
        return prompt_tokens(llama, messages[0].text, chat=True, anchor_id=anchor_id)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    turns = []
    for index, message in enumerate(messages):
        if not message.text.strip():
            raise InputError(f"message {index} is empty: give every message some text")
        turns.append({"role": "system" if message.role == "developer" else message.role, "content": message.text})
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise InputError("this model has no chat template in its GGUF: use /v1/completions")
    special = lambda token_id: llama.detokenize([token_id], special=True).decode("utf-8", "replace")  # noqa: E731
    formatter = Jinja2ChatFormatter(template=template, eos_token=special(llama.token_eos()), bos_token=special(llama.token_bos()))
    text = formatter(messages=turns).prompt
    ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    return apply_anchor(ids, anchor_id)
