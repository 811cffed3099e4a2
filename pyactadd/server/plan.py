"""From a validated request to what the worker runs: prompt token ids, steering, sampling.

The prompt and the steering go through the very functions ``pyactadd run`` uses
(:func:`pyactadd.runtime.generate.prompt_tokens` or :func:`pyactadd.prompts.chat.chat_ids`
with the vectors' :func:`common_anchor`, and later :meth:`Steering.set` with the prompt
length and each vector's own alignment), so a request generates exactly what
``pyactadd run`` generates with the same settings and seed.

Every check that does not need the model's time happens here, in the request handler,
so a bad request is answered at once with a 400 naming the field instead of waiting in
the queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pyactadd.errors import InputError
from pyactadd.prompts.chat import chat_ids
from pyactadd.runtime.generate import Sampling, common_anchor, prompt_tokens
from pyactadd.runtime.steering import Alignment, Steering, resolve_alignment
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
    """The steering one request asks for, ready for :meth:`Steering.set`: ``(vector, coeff,
    align)`` items, each with its alignment resolved (the request's, else the file's).

    ``key`` identifies the steering in force exactly: each vector's registration, its
    coefficient and the position of its first row (``None`` for ``all``). Two requests
    with equal keys steer identically; the worker resets the KV cache whenever it changes.
    """

    vectors: tuple[tuple[SteeringVector, float, Alignment], ...]
    key: tuple
    described: tuple[dict[str, Any], ...]  # echoed in the response

    @property
    def steered(self) -> bool:
        return bool(self.vectors)


UNSTEERED = SteeringPlan((), (), ())


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
    max_steering_bytes: int | None = None,
) -> Prepared:
    """Check ``request`` against the model and the registry and build what the worker runs.

    ``max_steering_bytes`` bounds what the request's steering adds to the engine: the
    engine holds one copy of each named vector's rows (scaled by its coefficient), so a
    request costs the sum of the vectors it names, repeats counted.

    Raises:
        ApiError: 400 naming the field at fault.
    """
    _refuse_misspelt_steering(request)
    entries = _entries(registry, request.steering)
    _check_steering_size(entries, max_steering_bytes)
    ids = _prompt_ids(llama, request, [(entry.vector, item.coeff) for entry, item in zip(entries, request.steering)])
    n_ctx = int(llama.n_ctx())
    max_tokens = _max_tokens(request, len(ids), n_ctx, max_tokens_limit)
    plan = steering_plan(entries, request.steering, prompt_length=len(ids), n_ctx=n_ctx)
    sampling = Sampling(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p, seed=request.seed)
    penalties = {
        name: value
        for name, value in (("frequency_penalty", request.frequency_penalty), ("presence_penalty", request.presence_penalty))
        if value
    }
    return Prepared(ids=ids, plan=plan, sampling=sampling, stop=request.stop, penalties=penalties)


def _prompt_field(request) -> str:
    return "messages" if isinstance(request, ChatCompletionRequest) else "prompt"


def _refuse_misspelt_steering(request) -> None:
    # Ignoring a misspelt "steering" would silently generate unsteered text.
    for key in request.model_extra or {}:
        if "steer" in key.lower():
            raise ApiError(400, f"unknown field {key!r}: did you mean 'steering'?", param=key, code="unknown_field")


def _prompt_ids(llama, request, vectors: Sequence[tuple[SteeringVector, float]]) -> list[int]:
    """The prompt's token ids, with the anchor every vector shares."""
    try:
        anchor = common_anchor(vectors)
    except InputError as exc:
        raise ApiError(400, str(exc), param="steering", code="incompatible_vectors") from None
    try:
        if isinstance(request, ChatCompletionRequest):
            return chat_tokens(llama, request.messages, anchor)
        return prompt_tokens(llama, request.prompt, anchor_id=anchor)
    except InputError as exc:
        raise ApiError(400, str(exc), param=_prompt_field(request), code="invalid_prompt") from None


def _max_tokens(request, n_prompt: int, n_ctx: int, limit: int) -> int:
    """The request's max_tokens (or its default), checked against the server's limit and the context."""
    field = _prompt_field(request)
    room = n_ctx - n_prompt
    if room < 1:
        raise ApiError(
            400,
            f"the {field} is {n_prompt} tokens, which leaves no room in the context of {n_ctx} tokens: shorten it",
            param=field,
            code="context_length_exceeded",
        )
    max_tokens = request.max_tokens
    if max_tokens is None:
        chat = isinstance(request, ChatCompletionRequest)
        return min(limit, room) if chat else min(DEFAULT_COMPLETION_MAX_TOKENS, limit, room)
    if max_tokens > limit:
        raise ApiError(
            400, f"max_tokens {max_tokens} is above this server's limit of {limit}", param="max_tokens", code="max_tokens_too_large"
        )
    if max_tokens > room:
        raise ApiError(
            400,
            f"the {field} ({n_prompt} tokens) plus max_tokens {max_tokens} exceeds the context of {n_ctx} tokens: "
            f"lower max_tokens to at most {room} or shorten the {field}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


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


def _check_steering_size(entries, limit: int | None) -> None:
    total = sum(entry.nbytes for entry in entries)
    if limit is not None and total > limit:
        raise ApiError(
            400,
            f"the steering names {total} bytes of vectors, above this server's limit of {limit} per request "
            "(--max-vector-bytes): name fewer or smaller vectors",
            param="steering",
            code="steering_too_large",
        )


def steering_plan(entries, items: Sequence[SteeringItem], *, prompt_length: int, n_ctx: int) -> SteeringPlan:
    """Resolve each item's alignment to the position of its first row and build the plan.

    Each vector keeps its own alignment (the item's, else the file's), as
    :meth:`Steering.set` places it, so per-position alignments mix freely in one request.

    Raises:
        ApiError: an alignment the vector cannot take, a span outside the context, or
            ``all`` mixed with per-position alignments.
    """
    if not items:
        return UNSTEERED
    aligns = [resolve_alignment(entry.vector, item.align) for entry, item in zip(entries, items)]
    offsets: list[int | None] = []
    for index, (entry, align) in enumerate(zip(entries, aligns)):
        try:
            offsets.append(Steering.first_position(entry.vector, align, prompt_length, n_ctx))
        except InputError as exc:
            raise ApiError(400, str(exc), param=f"steering[{index}].align", code="invalid_alignment") from None
    _refuse_all_with_positions(aligns)
    key = tuple((entry.uid, float(item.coeff), offset) for entry, item, offset in zip(entries, items, offsets))
    described = tuple(
        {"vector": entry.name, "coeff": item.coeff, "align": align, "offset": offset}
        for entry, item, align, offset in zip(entries, items, aligns, offsets)
    )
    vectors = tuple((entry.vector, float(item.coeff), align) for entry, item, align in zip(entries, items, aligns))
    return SteeringPlan(vectors, key, described)


def _refuse_all_with_positions(aligns: Sequence[Alignment]) -> None:
    # Kept from the first server, whose one-alignment plan could not express this mix.
    # Steering.set can (pyactadd run mixes a back and an all file); allowing it here
    # changes what the API accepts, so it waits for its own change.
    if "all" in aligns and any(a != "all" for a in aligns):
        index = next(i for i, a in enumerate(aligns) if a != aligns[0])
        raise ApiError(
            400,
            "alignment 'all' cannot be combined with per-position alignments in one request: "
            "give every vector 'all', or none",
            param=f"steering[{index}].align",
            code="invalid_alignment",
        )


def chat_tokens(llama, messages: Sequence[ChatMessage], anchor_id: int | None) -> list[int]:
    """Token ids of a chat in the model's template (:func:`pyactadd.prompts.chat.chat_ids`,
    the function ``pyactadd run --chat`` uses for its single user turn).

    Raises:
        InputError: an empty message, or a model without a chat template.
    """
    return chat_ids(llama, [{"role": m.role, "content": m.text} for m in messages], anchor_id=anchor_id)
