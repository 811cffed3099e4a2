"""Many sequences in one ``llama_decode``, each with its own steering: continuous batching.

A :class:`Batcher` owns a llama.cpp context of its own on a loaded model (``n_seq_max``
sequences, one unified KV cache) and a steering engine whose tensors are bound to
sequence ids. Each :meth:`Batcher.step` packs one token of every generating sequence and
chunks of waiting prompts into one batch, declares that batch to the engine (which checks
every micro-batch llama.cpp makes of it against the declaration and stops the graph on a
mismatch, so a row is never added to another sequence's token), decodes, and samples each
sequence with its own sampler chain. Requests join between steps and leave when they end.

Prefix reuse: a slot keeps its last sequence in the KV cache; a new request whose
steering equals that sequence's (same vectors, coefficients and first positions) and whose
prompt starts the same way re-evaluates only the rest. Requests that run at the same time
share too: one whose prompt starts as a running sequence's (same steering) waits for that
sequence's prompt cells and shares them (``llama_memory_seq_cp``), so ``n`` samples of one
prompt evaluate it once.

:func:`generate_batch` is the one-call form: every request, completions in order.
"""

from __future__ import annotations

import ctypes
import math
import numbers
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from pyactadd.errors import EngineError, InputError
from pyactadd.native import engine_module, llama_cpp_module
from pyactadd.runtime.context_memory import context_memory_problem
from pyactadd.runtime.generate import Sampling, common_anchor, prompt_tokens
from pyactadd.runtime.logits import token_logprob
from pyactadd.runtime.sampler import SequenceSampler
from pyactadd.runtime.steering import (
    Alignment,
    SteerItem,
    Steering,
    check_count,
    check_open,
    check_type,
    model_fingerprint,
    parse_alignment,
    resolve_alignment,
    steer_items,
)
from pyactadd.vector.layers import to_llama_index
from pyactadd.vector.value import check_coefficient, scaled_rows

BATCH_MISMATCH = -3  # PYACTADD_STATUS_BATCH_MISMATCH in pyactadd.h
PENALTIES = ("frequency_penalty", "presence_penalty")
_NUMERICS = (
    "flash_attn_type", "type_k", "type_v", "rope_scaling_type", "rope_freq_base", "rope_freq_scale",
    "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "offload_kqv", "swa_full",
)


@dataclass(frozen=True)
class Request:
    """One completion to generate: prompt token ids, steering, sampling and stop strings.

    ``steering`` takes what :meth:`Steering.set` takes (``(vector, coeff)`` or
    ``(vector, coeff, align)`` items; empty: unsteered); ``align`` overrides every item's.
    ``penalties`` may hold ``frequency_penalty`` and ``presence_penalty`` (OpenAI's, over the
    last 64 tokens, as llama-cpp-python applies them). ``logprobs`` records each generated
    token's log-probability under the model's own distribution (the logits it was drawn
    from, before penalties, temperature or truncation) in :attr:`Completion.logprobs`.
    """

    ids: Sequence[int]
    steering: Sequence[SteerItem] = ()
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    align: Alignment | None = None
    penalties: Mapping[str, float] = field(default_factory=dict)
    logprobs: bool = False


@dataclass(frozen=True)
class Completion:
    """What a request generated; ``finish_reason`` is ``stop`` (end of text or a stop string) or ``length``."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: str
    n_prompt: int
    n_reused: int = 0  # prompt tokens taken from the KV cache instead of evaluated
    logprobs: tuple[float, ...] | None = None  # one per token, when the request asked for them


@dataclass
class Placed:
    """One steering tensor as the engine gets it: rows already scaled by the coefficient."""

    il: int
    rows: np.ndarray
    offset: int
    all_positions: bool


class Handle:
    """A request inside a :class:`Batcher`: its progress, until it finishes or is cancelled."""

    def __init__(self, request: Request, placed: list[Placed], key: tuple) -> None:
        self.request = request
        self.ids = [int(t) for t in request.ids]
        self.placed = placed
        self.key = key
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed out as pieces
        self.completion: Completion | None = None
        self.cancelled = False
        self.n_reused = 0


@dataclass
class Event:
    """What one step did for one request: a new text ``piece`` and, at the end, its ``completion``."""

    handle: Handle
    piece: str = ""
    completion: Completion | None = None


class Slot:
    """One sequence id of the context: the request it runs and what its KV cells hold."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.handle: Handle | None = None
        self.cached: list[int] = []  # tokens in the KV cache for this sequence
        self.cached_key: tuple | None = None
        self.n_past = 0  # prompt + generated tokens evaluated
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.sampler: SequenceSampler | None = None
        self.tensor_ids: list[int] = []
        self.next_token: int | None = None
        self.cached_request: Request | None = None  # keeps the vectors its key names alive
        self.donor: Slot | None = None  # a running sequence whose prompt cells this one will share


class BatchFailed(EngineError):
    """A batched decode failed; every request that was in it (``handles``) is dropped."""

    def __init__(self, message: str, handles: list[Handle]) -> None:
        super().__init__(message)
        self.handles = handles


class Batcher:
    """Continuous batching of steered requests on a loaded Llama (see the module docstring).

    Not thread-safe: one thread calls :meth:`start`, :meth:`step` and :meth:`cancel`.
    The Llama's own context and steering are untouched; closing the Llama closes the batcher.

    Example::

        batcher = Batcher(llm, 8)
        a = batcher.start(Request(ids, [(love, 4.0)]))
        b = batcher.start(Request(ids))                  # unsteered, same batch
        while batcher.busy:
            for event in batcher.step():
                print(event.piece, end="")
        batcher.close()
    """

    def __init__(self, llama, n_parallel: int = 8, *, n_ctx: int | None = None, n_batch: int = 512, prefix_reuse: bool = True) -> None:
        check_open(llama)
        check_count(n_parallel, "n_parallel", 1)
        check_count(n_batch, "n_batch", 1)
        check_type(prefix_reuse, bool, "prefix_reuse", "True or False")
        if n_batch < n_parallel:
            raise InputError(f"n_batch ({n_batch}) must be at least n_parallel ({n_parallel}): every sequence needs a token per step")
        self.n_ctx = check_count(n_ctx, "n_ctx", 16) if n_ctx is not None else int(llama.n_ctx())
        self._llama = llama
        self._guard = Steering.of(llama).guard
        self.fingerprint = model_fingerprint(llama)
        self.n_parallel, self.n_batch, self.prefix_reuse = n_parallel, n_batch, prefix_reuse
        self._lc = llama_cpp_module()
        self._engine = engine_module().Engine(self.fingerprint.n_embd, self.fingerprint.n_layer, False)
        self._ctx = self._new_context(llama)
        self._batch = self._lc.llama_batch_init(n_batch, 0, 1)
        self._vocab = self._lc.llama_model_get_vocab(llama.model)
        self._slots = [Slot(i) for i in range(n_parallel)]
        self._queue: deque[Handle] = deque()
        self._guard.on_free(self.close)

    def _new_context(self, llama):
        lc, own = self._lc, llama.context_params
        total = self.n_ctx * self.n_parallel
        problem = context_memory_problem(Path(llama.model_path), total, "a total context (n_ctx x n_parallel) of")
        if problem is not None:
            raise InputError(problem)
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = total, self.n_batch, self.n_batch
        params.n_seq_max, params.kv_unified = self.n_parallel, True
        params.n_threads, params.n_threads_batch = own.n_threads, own.n_threads_batch
        # The Llama's own numerics settings (llama-cpp-python turns flash attention off where
        # llama.cpp's default is auto), so a batched sequence computes what a solo run computes.
        for name in _NUMERICS:
            setattr(params, name, getattr(own, name))
        self._engine.attach(ctypes.addressof(params))
        with self._guard.using("batch"):
            ctx = lc.llama_init_from_model(llama.model, params)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not make a context of {total} tokens ({self.n_parallel} sequences x {self.n_ctx}): "
                "lower the parallel sequences or the context per sequence"
            )
        return ctx

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (or the Llama was closed)."""
        return self._ctx is None

    @property
    def active(self) -> int:
        """Requests holding a sequence now."""
        return sum(slot.handle is not None for slot in self._slots)

    @property
    def busy(self) -> int:
        """Requests running or waiting."""
        return self.active + sum(not h.cancelled for h in self._queue)

    def close(self) -> None:
        """Free the batcher's context (idempotent); requests still in it are dropped."""
        if self._ctx is None:
            return
        self._guard.forget_free(self.close)
        for slot in self._slots:
            self._release(slot, keep_cache=False, touch_cache=False)
        self._lc.llama_batch_free(self._batch)
        self._lc.llama_free(self._ctx)
        self._ctx = None

    def _check_usable(self) -> None:
        if self._ctx is None:
            raise EngineError("this Batcher is closed (or its Llama is): make a new one")

    def start(self, request: Request) -> Handle:
        """Queue ``request``; it joins the batch at the next :meth:`step` with a free sequence.

        Raises:
            InputError: a malformed request (named), token ids outside the vocabulary, a
                prompt plus max_tokens longer than the context per sequence, or a vector that
                does not fit the model or the prompt.
            ModelMismatchError: a vector was made for another model.
            EngineError: the batcher or its Llama is closed.
        """
        self._check_usable()
        check_type(request, Request, "request", "a pyactadd.runtime.batch.Request")
        ids = self._check_ids(request)
        check_type(request.sampling, Sampling, "request.sampling", "a pyactadd.Sampling")
        check_type(request.stop, (list, tuple), "request.stop", "a list of strings")
        for stop in request.stop:
            check_type(stop, str, "request.stop", "a list of strings")
        check_type(request.logprobs, bool, "request.logprobs", "True or False")
        check_type(request.penalties, Mapping, "request.penalties", "a mapping")
        for name, value in request.penalties.items():
            if name not in PENALTIES:
                raise InputError(f"request.penalties: unknown {name!r}: use {' or '.join(PENALTIES)}")
            check_type(value, numbers.Real, f"request.penalties[{name!r}]", "a number")
            if not math.isfinite(value):
                raise InputError(f"request.penalties[{name!r}] must be finite, got {value}")
        if len(ids) + request.sampling.max_tokens > self.n_ctx:
            raise InputError(
                f"prompt ({len(ids)} tokens) plus max_tokens {request.sampling.max_tokens} exceeds the context of "
                f"{self.n_ctx} tokens per sequence: raise the context or lower max_tokens"
            )
        placed, key = self._place(request, len(ids))
        handle = Handle(request, placed, key)
        self._queue.append(handle)
        return handle

    def _check_ids(self, request: Request) -> list[int]:
        check_type(request.ids, (list, tuple), "request.ids", "a list of token ids")
        n_vocab = self.fingerprint.n_vocab
        if not request.ids:
            raise InputError("request.ids is empty: give at least one prompt token")
        for token in request.ids:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < n_vocab:
                raise InputError(f"request.ids holds {token!r}, not a token id of this model (0..{n_vocab - 1})")
        return [int(t) for t in request.ids]

    def _place(self, request: Request, n_prompt: int) -> tuple[list[Placed], tuple]:
        # Validate and scale here, so nothing invalid reaches the engine mid-batch.
        items = steer_items(list(request.steering)) if request.steering else []
        override = parse_alignment(request.align) if request.align is not None else None
        placed: list[Placed] = []
        key = []
        for vector, coeff, own in items:
            vector.check_fits(self.fingerprint)
            check_coefficient(coeff)
            align = resolve_alignment(vector, own, override)
            offset = Steering.first_position(vector, align, n_prompt, self.n_ctx)
            for layer in vector.layer_ids:
                rows = np.ascontiguousarray(scaled_rows(vector.layers[layer], coeff, layer), dtype=np.float32)
                placed.append(Placed(to_llama_index(layer), rows, offset or 0, offset is None))
            key.append((id(vector), coeff, offset))
        return placed, tuple(key)

    def cancel(self, handle: Handle) -> None:
        """Drop ``handle``: a waiting request never starts, a running one frees its sequence now."""
        handle.cancelled = True
        if self._ctx is None:  # closed: its sequences are gone already
            return
        for slot in self._slots:
            if slot.handle is handle:
                self._release(slot, keep_cache=self.prefix_reuse)

    def step(self) -> list[Event]:
        """Admit waiting requests, decode one batch, sample; the events of this step.

        Raises:
            BatchFailed: llama.cpp or the engine failed the decode; the requests in it are
                dropped (``handles``) and the batcher stays usable.
            EngineError: the batcher or its Llama is closed.
        """
        self._check_usable()
        # One use of the Llama for the whole step: a close() meanwhile frees the model (and
        # this batcher's context) only after the sampling below has read its logits.
        with self._guard.using("batch"):
            self._check_usable()
            self._admit()
            fed = self._fill_batch()
            if not fed:
                return []
            self._decode(fed)
            events: list[Event] = []
            for slot, _, index in fed:
                if index is not None and slot.handle is not None:
                    token = slot.sampler.sample(self._ctx, index)
                    logprob = self._logprob(index, token) if slot.handle.request.logprobs else None
                    self._advance(slot, token, events, logprob)
            return events

    def _admit(self) -> None:
        while self._queue:
            free = [slot for slot in self._slots if slot.handle is None]
            if not free:
                return
            handle = self._queue.popleft()
            if not handle.cancelled:
                self._occupy(*self._choose(free, handle), handle)

    def _choose(self, free: list[Slot], handle: Handle) -> tuple[Slot, int]:
        # The free sequence whose cached tokens share the longest prefix with this prompt;
        # else the one with the least cached (least lost).
        best = max(free, key=lambda slot: (self._shared(slot, handle), -len(slot.cached)))
        return best, self._shared(best, handle)

    def _shared(self, slot: Slot, handle: Handle, *, upcoming: bool = False) -> int:
        # Prompt tokens of handle whose KV cells slot holds, made under the same steering;
        # with upcoming, also those its pending prompt will hold after it is evaluated.
        if not self.prefix_reuse or slot.cached_key != handle.key:
            return 0
        known = slot.cached + slot.pending if upcoming else slot.cached
        n = 0
        for a, b in zip(known, handle.ids):
            if a != b:
                break
            n += 1
        return min(n, len(handle.ids) - 1)  # the last prompt token is evaluated for its logits

    def _find_donor(self, slot: Slot) -> None:
        # A running sequence under the same steering whose prompt starts as this one's, for
        # longer than this slot's own cache: this one waits for those cells and shares them
        # (llama_memory_seq_cp) instead of evaluating them again, so n samples of one
        # prompt evaluate it once.
        others = [s for s in self._slots if s.handle is not None and s is not slot and s.donor is None]
        donor = max(others, key=lambda s: self._shared(s, slot.handle, upcoming=True), default=None)
        if donor is not None and self._shared(donor, slot.handle, upcoming=True) > slot.n_past:
            slot.donor = donor

    def _take_shared(self) -> None:
        for slot in self._slots:
            donor = slot.donor
            if donor is None or (donor.pending and self._shared(donor, slot.handle, upcoming=True) > slot.n_past):
                continue  # nothing to wait for, or the donor's prompt is still to be evaluated
            slot.donor = None
            n = self._shared(donor, slot.handle)
            if n <= slot.n_past:
                continue  # the donor went another way: evaluate alone
            memory = self._lc.llama_get_memory(self._ctx)
            self._lc.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            self._lc.llama_memory_seq_cp(memory, donor.seq_id, slot.seq_id, 0, n)
            ids = slot.handle.ids
            slot.cached, slot.n_past, slot.pending = ids[:n], n, ids[n:]
            slot.handle.n_reused = n

    def _occupy(self, slot: Slot, n_keep: int, handle: Handle) -> None:
        memory = self._lc.llama_get_memory(self._ctx)
        if not self._lc.llama_memory_seq_rm(memory, slot.seq_id, n_keep, -1):
            self._lc.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            n_keep = 0
        slot.cached, slot.n_past, slot.pending = slot.cached[:n_keep], n_keep, handle.ids[n_keep:]
        slot.handle, slot.cached_key, slot.cached_request = handle, handle.key, handle.request
        handle.n_reused = n_keep
        sampling = handle.request.sampling
        slot.sampler = SequenceSampler(
            sampling.temperature, sampling.top_p, sampling.seed, n_vocab=self.fingerprint.n_vocab, **handle.request.penalties
        )
        try:
            for placed in handle.placed:
                tensor_id = self._engine.add(placed.il, placed.rows, placed.offset, placed.all_positions)
                slot.tensor_ids.append(tensor_id)
                self._engine.set_sequences(tensor_id, [slot.seq_id])
        except ValueError as exc:  # validated in start(); the engine's own check disagreeing is a bug
            self._release(slot, keep_cache=False)
            raise EngineError(f"steering engine refused a vector: {exc}") from None
        self._find_donor(slot)

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _fill_batch(self) -> list[tuple[Slot, list[int], int | None]]:
        # One token of every generating sequence first, so a long prompt never stalls
        # them; then prompt chunks fill the rest of the batch.
        self._take_shared()
        fed: list[tuple[Slot, list[int], int | None]] = []
        n = 0
        for slot in self._slots:
            if slot.handle is not None and slot.next_token is not None:
                self._put(n, slot.next_token, slot.n_past, slot.seq_id, True)
                fed.append((slot, [slot.next_token], n))
                n += 1
        for slot in self._slots:
            if slot.handle is not None and slot.pending and slot.donor is None and n < self.n_batch:
                chunk = slot.pending[: self.n_batch - n]
                last = len(chunk) == len(slot.pending)
                for i, token in enumerate(chunk):
                    self._put(n + i, token, slot.n_past + i, slot.seq_id, last and i == len(chunk) - 1)
                fed.append((slot, chunk, n + len(chunk) - 1 if last else None))
                n += len(chunk)
        self._batch.n_tokens = n
        return fed

    def _decode(self, fed: list[tuple[Slot, list[int], int | None]]) -> None:
        try:
            self._engine.declare_batch(ctypes.addressof(self._batch))
            rc = self._lc.llama_decode(self._ctx, self._batch)
            failure = self._failure(rc)
        except ValueError as exc:
            failure = f"steering engine: {exc}"
        if failure is not None:
            dropped = [slot.handle for slot in self._slots if slot.handle is not None]
            for slot in self._slots:
                self._release(slot, keep_cache=False)
            raise BatchFailed(failure, dropped)
        for slot, chunk, _ in fed:
            slot.cached.extend(chunk)
            slot.n_past += len(chunk)
            if slot.pending:
                slot.pending = slot.pending[len(chunk):]
            else:
                slot.next_token = None

    def _failure(self, rc: int) -> str | None:
        status = self._engine.batch_status()
        if status == BATCH_MISMATCH or self._engine.stats()["n_errors"]:
            message = self._engine.last_error()
            self._engine.reset_stats()
            return f"steering engine: {message}"
        if rc == 1:
            return "llama_decode found no room in the KV cache for the batch"
        if rc != 0:
            return f"llama_decode returned {rc}"
        return None

    def _logprob(self, index: int, token: int) -> float:
        row = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._ctx, index), shape=(self.fingerprint.n_vocab,))
        return token_logprob(row, token)

    def _advance(self, slot: Slot, token: int, events: list[Event], logprob: float | None = None) -> None:
        handle = slot.handle
        if self._lc.llama_vocab_is_eog(self._vocab, token):
            return self._finish(slot, "stop", events)
        handle.tokens.append(token)
        if logprob is not None:
            handle.logprobs.append(logprob)
        text = self._llama.detokenize(handle.tokens, prev_tokens=handle.ids).decode("utf-8", errors="ignore")
        cut = first_stop(text, handle.request.stop)
        handle.text = text if cut is None else text[:cut]
        if cut is not None:
            return self._finish(slot, "stop", events)
        if len(handle.tokens) >= handle.request.sampling.max_tokens:
            return self._finish(slot, "length", events)
        slot.next_token = token
        safe = len(text) - held_back(text, handle.request.stop)
        if safe > handle.emitted:
            events.append(Event(handle, text[handle.emitted:safe]))
            handle.emitted = safe

    def _finish(self, slot: Slot, reason: str, events: list[Event]) -> None:
        handle = slot.handle
        logprobs = tuple(handle.logprobs) if handle.request.logprobs else None
        handle.completion = Completion(handle.text, tuple(handle.tokens), reason, len(handle.ids), handle.n_reused, logprobs)
        events.append(Event(handle, handle.text[handle.emitted:], handle.completion))
        handle.emitted = len(handle.text)
        self._release(slot, keep_cache=self.prefix_reuse)

    def _release(self, slot: Slot, keep_cache: bool, touch_cache: bool = True) -> None:
        for tensor_id in slot.tensor_ids:
            self._engine.remove(tensor_id)
        slot.tensor_ids = []
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler, slot.handle, slot.next_token, slot.pending, slot.donor = None, None, None, [], None
        if not keep_cache:
            if touch_cache:
                self._lc.llama_memory_seq_rm(self._lc.llama_get_memory(self._ctx), slot.seq_id, -1, -1)
            slot.cached, slot.cached_key, slot.cached_request, slot.n_past = [], None, None, 0


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could start a stop string (not streamed yet)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def generate_batch(
    llama,
    requests: Sequence[Request],
    *,
    parallel: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Generate every request, up to ``parallel`` sequences per ``llama_decode``; completions in order.

    Each request keeps its own steering, sampler and seed; the same requests give the
    same completions on every run. ``progress(done, total)`` is called as requests finish.

    Raises:
        InputError: a malformed request (see :meth:`Batcher.start`).
        BatchFailed, EngineError: as :meth:`Batcher.step`; the Llama is closed.
    """
    check_type(requests, (list, tuple), "requests", "a list of Request")
    check_count(parallel, "parallel", 1)
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function of (done, total), got {type(progress).__name__}")
    if not requests:
        return []
    for index, request in enumerate(requests):
        check_type(request, Request, f"requests[{index}]", "a pyactadd.runtime.batch.Request")
    need = max((len(r.ids) + r.sampling.max_tokens for r in requests if isinstance(r.ids, (list, tuple))), default=16)
    batcher = Batcher(llama, min(parallel, len(requests)), n_ctx=max(16, need))
    try:
        handles = [batcher.start(request) for request in requests]
        done = 0
        while batcher.busy:
            for event in batcher.step():
                if event.completion is not None and progress is not None:
                    done += 1
                    progress(done, len(requests))
        return [handle.completion for handle in handles]
    finally:
        batcher.close()


def run_prompts(
    llama,
    prompts: Sequence[str],
    vectors: Sequence[SteerItem],
    sampling: Sampling,
    *,
    align: Alignment | None = None,
    chat: bool = False,
    compare: bool = False,
    parallel: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """:func:`~pyactadd.runtime.generate.run` for many prompts, all in one continuous batch.

    Returns one dict per prompt, in order: ``prompt``, ``prompt_tokens``, ``steered`` and,
    with ``compare``, ``unsteered`` (decoded beside the steered one, same seed).
    """
    check_type(prompts, (list, tuple), "prompts", "a list of strings")
    anchor = common_anchor(vectors)
    ids = [prompt_tokens(llama, prompt, chat=chat, anchor_id=anchor) for prompt in prompts]
    kinds = ("unsteered", "steered") if compare else ("steered",)
    requests = [Request(each, list(vectors) if kind == "steered" else (), sampling, align=align) for each in ids for kind in kinds]
    completions = iter(generate_batch(llama, requests, parallel=parallel, progress=progress))
    return [
        {"prompt": prompt, "prompt_tokens": each, **{kind: next(completions).text for kind in kinds}}
        for prompt, each in zip(prompts, ids)
    ]
