"""The one thread that owns the Llama: a bounded queue of jobs, served one at a time.

Request handlers (on the asyncio loop) put a :class:`Job` in the queue and read its
events; the worker thread runs it and sends events back through the loop. A full queue
refuses the job at once (:class:`QueueFull`, answered 503 with Retry-After).

Isolation. The steering in force is identified by the plan's ``key`` (each vector's
registration, coefficient and resolved first position). When a job's key differs from
the one in force, :meth:`Steering.set`/:meth:`Steering.clear` replace the steering and
reset llama-cpp-python's cached prefix, so no position computed under one steering is
reused under another. With the prompt cache off (the default) the KV cache is also reset
between jobs with the same key: every job then evaluates its prompt from scratch, which
makes a response depend on its request alone and equal to ``pyactadd run``'s output bit
for bit (reusing a prefix is not bit-exact in llama.cpp: the reused positions were
computed in other micro-batches). ``prompt_cache=True`` reuses the common prefix between
consecutive jobs with the same steering key, trading that exactness for speed on long
shared prompts.

Cancellation. A job whose client went away is marked cancelled; a queued one is skipped,
a running one stops at the next token (a stopping criterion checks the flag).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pyactadd.errors import InputError, ModelMismatchError
from pyactadd.runtime.steering import Steering
from pyactadd.server.plan import Prepared
from pyactadd.server.schemas import ApiError

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """What a job reports: ``text`` (a streamed piece), ``done`` or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: ApiError | None = None


def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    """OpenAI's usage counts."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


class BackendLost(Exception):
    """The model's backend is gone for good (an RPC worker died mid-graph); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueueFull(Exception):
    """The queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, retry_after: int, waiting: int) -> None:
        super().__init__(f"queue full ({waiting} waiting)")
        self.retry_after = retry_after
        self.waiting = waiting


@dataclass
class Job:
    """One request for the worker. Create it on the event loop that reads its events."""

    prepared: Prepared
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop this job: skipped if still queued, stopped at the next token if running."""
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        """Send ``event`` to the reader (thread-safe; dropped when the loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class QueueWorker(abc.ABC):
    """What every server worker shares: the bounded queue of waiting jobs, submitting,
    counters, Retry-After, stopping and a lost backend. Subclasses run the thread
    (``_run``) and say which jobs are running (``_running_jobs``) on ``slots`` sequences."""

    slots = 1

    def __init__(self, *, queue_size: int, thread_name: str) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._stopping = False
        self.lost: str | None = None  # set by lose_backend(); the model cannot be used again
        self._durations: deque[float] = deque(maxlen=32)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    @abc.abstractmethod
    def _run(self) -> None:
        """The worker thread: take jobs from the queue until a None arrives."""

    @abc.abstractmethod
    def _running_jobs(self) -> list[Job]:
        """The jobs the model is generating now (read from other threads)."""

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the queued ones, stop the running ones and join the thread."""
        self._stopping = True
        self._fail_queued(ApiError(503, "the server is shutting down", code="shutting_down"))
        for running in self._running_jobs():
            running.cancel()
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # a job slipped in; the thread sees _stopping after it
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def lose_backend(self, reason: str) -> None:
        """The model's backend is gone (an RPC worker died): fail the running jobs, then every queued one.

        Called from ggml's own thread; the worker thread stays blocked inside llama.cpp for
        good, so nothing will touch the model again and new jobs are refused (BackendLost).
        """
        self.lost = reason
        for running in self._running_jobs():
            running.emit(Event("error", error=ApiError(502, f"generation failed: {reason}", code="backend_lost")))
            self.counts["failed"] += 1
        self._fail_queued(ApiError(503, f"the model is unavailable: {reason}", code="backend_lost"))

    def _fail_queued(self, error: ApiError) -> None:
        """Answer every job still in the queue with ``error``."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(Event("error", error=error))

    # --- submitting ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise :class:`QueueFull` when the queue is full or the server is stopping,
        :class:`BackendLost` when the model can no longer run."""
        if self.lost is not None:
            raise BackendLost(self.lost)
        if self._stopping:
            raise QueueFull(self.retry_after(), self.waiting)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.counts["rejected"] += 1
            raise QueueFull(self.retry_after(), self.waiting) from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running_jobs())

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free (a running job ends): the median job time
        over the slots, 1 to 60."""
        typical = statistics.median(self._durations) if self._durations else 1.0
        return max(1, min(60, math.ceil(typical / self.slots)))

    def status(self) -> dict[str, Any]:
        """The queue's state for /health: running and waiting jobs, capacity, slots (busy), counters."""
        running = self.running
        return {
            "running": running, "waiting": self.waiting, "capacity": self.queue_size,
            "slots": self.slots, "slots_busy": running, **self.counts,
        }


class Worker(QueueWorker):
    """Serves jobs on one llama_cpp.Llama (with a Steering attached), one at a time."""

    def __init__(self, llama, *, queue_size: int = 8, prompt_cache: bool = False) -> None:
        super().__init__(queue_size=queue_size, thread_name="pyactadd-worker")
        self._llama = llama
        self._steering = Steering.of(llama)
        self._prompt_cache = prompt_cache
        self._key: tuple | None = None  # steering in force; None: unknown, set it afresh
        self._running: Job | None = None
        self.counts["steering_changes"] = 0

    def _running_jobs(self) -> list[Job]:
        running = self._running
        return [running] if running is not None else []

    # --- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled or self._stopping:
                self.counts["cancelled"] += 1
                job.emit(Event("error", error=ApiError(499, "cancelled", code="cancelled")))
                continue
            self._running = job
            started = time.perf_counter()
            try:
                outcome = self._serve(job)
            finally:
                self._running = None
                self._durations.append(time.perf_counter() - started)
            # Reported once the worker is free, so /health agrees with what the client saw.
            job.emit(outcome)

    def _serve(self, job: Job) -> Event:
        prepared = job.prepared
        try:
            self._apply(prepared)
            text, finish_reason, usage = self._generate(job)
            self._steering.check_errors()
        except (InputError, ModelMismatchError) as exc:
            self._key = None
            self.counts["failed"] += 1
            return Event("error", error=ApiError(400, str(exc), code="invalid_request"))
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one job
            self._key = None
            self.counts["failed"] += 1
            logger.exception("generation failed")
            return Event("error", error=ApiError(500, f"generation failed: {exc}", code="internal_error"))
        if job.cancelled:
            self.counts["cancelled"] += 1
        else:
            self.counts["served"] += 1
        return Event("done", text=text, finish_reason=finish_reason, usage=usage)

    def _apply(self, prepared: Prepared) -> None:
        """Put the job's steering in force; reset the KV cache unless the prompt cache may reuse it."""
        plan = prepared.plan
        if plan.key != self._key:
            self._key = None  # unknown until set() succeeds
            if plan.steered:
                self._steering.set(list(plan.vectors), prompt_length=len(prepared.ids))
            else:
                self._steering.clear()  # resets the Llama's cached prefix
            self._key = plan.key
            self.counts["steering_changes"] += 1
        elif not self._prompt_cache:
            self._llama.reset()

    def _generate(self, job: Job) -> tuple[str, str | None, dict[str, int]]:
        from llama_cpp import StoppingCriteriaList

        prepared = job.prepared
        sampling = prepared.sampling
        self._steering.reset_stats()
        # The same call as pyactadd.runtime.generate.complete (what `pyactadd run` uses), plus the
        # request's stop sequences and a criterion that ends a cancelled job at once.
        kwargs: dict[str, Any] = dict(
            prompt=list(prepared.ids),
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: job.cancelled]),
            **prepared.penalties,
        )
        if prepared.stop:
            kwargs["stop"] = list(prepared.stop)
        if not job.stream:
            result = self._llama.create_completion(**kwargs)
            choice = result["choices"][0]
            return choice["text"], choice["finish_reason"], dict(result["usage"])
        pieces: list[str] = []
        finish_reason = None
        chunks = self._llama.create_completion(stream=True, **kwargs)
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                if choice["text"]:
                    pieces.append(choice["text"])
                    job.emit(Event("text", text=choice["text"]))
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if job.cancelled:
                    break
        finally:
            chunks.close()
        text = "".join(pieces)
        # Streaming chunks do not carry token counts: count the text's tokens.
        completion = len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0
        n_prompt = len(prepared.ids)
        return text, finish_reason, usage(n_prompt, completion)
