"""The thread that owns the Llama with ``--parallel N``: up to N jobs in one continuous batch.

The same interface as :class:`pyactadd.server.worker.Worker` (submit, QueueFull,
BackendLost, lose_backend, stop, status), but its one thread drives a
:class:`pyactadd.runtime.batch.Batcher` of N sequences: a waiting job joins the running
batch between two decode steps as soon as a sequence is free, and leaves it when it ends.
Each sequence has its own steering (bound to its sequence id in the engine, so no row is
ever added to another request's token), sampler, seed, stop strings and penalties.

Jobs wait in the bounded queue (``queue_size``) until a sequence is free. A cancelled job
(its client went away) is dropped from the batch at the next step, freeing its sequence at
once. A failed decode fails only the jobs that were in it (500); the worker keeps serving.
When idle the thread blocks on the queue.

Prefix reuse (``prompt_cache``): a sequence keeps its last request in the KV cache, and a
new request with the same steering and a common prompt prefix evaluates only the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from pyactadd.errors import InputError, ModelMismatchError
from pyactadd.runtime.batch import Batcher, BatchFailed, Handle, Request
from pyactadd.server.plan import Prepared
from pyactadd.server.schemas import ApiError
from pyactadd.server.worker import Event, Job, QueueWorker, usage

logger = logging.getLogger(__name__)

N_BATCH = 512  # tokens per decode step: one per generating sequence, prompt chunks in the rest


def batch_request(prepared: Prepared) -> Request:
    """The :class:`Request` a prepared job runs: its prompt, resolved steering, sampling, stops, penalties."""
    return Request(
        ids=list(prepared.ids),
        steering=list(prepared.plan.vectors),
        sampling=prepared.sampling,
        stop=tuple(prepared.stop or ()),
        penalties=dict(prepared.penalties),
    )


class BatchWorker(QueueWorker):
    """Serves jobs on one llama_cpp.Llama, ``parallel`` at a time in one continuous batch.

    The batch has a context of its own with ``llama.n_ctx()`` tokens per sequence.

    Raises:
        InputError: that context (``n_ctx`` x ``parallel``) would not fit in free memory.
        EngineError: llama.cpp could not make it.
    """

    def __init__(self, llama, *, parallel: int, queue_size: int = 8, prompt_cache: bool = False) -> None:
        super().__init__(queue_size=queue_size, thread_name="pyactadd-batch-worker")
        self.slots = parallel
        self._batcher = Batcher(
            llama, parallel, n_ctx=int(llama.n_ctx()), n_batch=max(N_BATCH, parallel), prefix_reuse=prompt_cache
        )
        self._lock = threading.Lock()  # guards _running against /health, stop() and lose_backend()
        self._running: dict[Handle, tuple[Job, float]] = {}

    def _running_jobs(self) -> list[Job]:
        with self._lock:
            return [job for job, _ in self._running.values()]

    def stop(self, timeout: float = 10.0) -> None:
        """As :meth:`QueueWorker.stop`, then free the batch's context."""
        super().stop(timeout)
        if not self._thread.is_alive():
            self._batcher.close()

    # --- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while self.lost is None:
            if not self._running and not self._take(block=True):
                return
            while len(self._running) < self.slots:  # join the batch between two steps
                if not self._take(block=False):
                    break
            if self._stopping:
                self._drop_all()
                return
            self._drop_cancelled()
            if self._running:
                self._step()

    def _take(self, *, block: bool) -> bool:
        """Start the next queued job in the batch; False when there is none (or the stop sentinel came)."""
        try:
            job = self._queue.get(block=block)
        except queue.Empty:
            return False
        if job is None:
            self._stopping = True
            return False
        if job.cancelled or self._stopping:
            self.counts["cancelled"] += 1
            job.emit(Event("error", error=ApiError(499, "cancelled", code="cancelled")))
            return True
        try:
            handle = self._batcher.start(batch_request(job.prepared))
        except (InputError, ModelMismatchError) as exc:
            self._fail(job, ApiError(400, str(exc), code="invalid_request"))
            return True
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one job
            logger.exception("generation failed")
            self._fail(job, ApiError(500, f"generation failed: {exc}", code="internal_error"))
            return True
        with self._lock:
            self._running[handle] = (job, time.perf_counter())
        return True

    def _step(self) -> None:
        try:
            events = self._batcher.step()
        except BatchFailed as exc:
            logger.error("a batched decode failed: %s", exc)
            self._fail_handles(exc.handles, ApiError(500, f"generation failed: {exc}", code="internal_error"))
            return
        except Exception as exc:  # noqa: BLE001 - drop the batch, keep serving
            logger.exception("a batch step failed")
            self._fail_handles(list(self._running), ApiError(500, f"generation failed: {exc}", code="internal_error"))
            return
        if self.lost is not None:  # lose_backend() has answered these jobs
            return
        for event in events:
            job, _ = self._running[event.handle]
            if event.piece and job.stream:
                job.emit(Event("text", text=event.piece))
            done = event.completion
            if done is not None:
                self.counts["served"] += 1
                counts = usage(done.n_prompt, len(done.tokens))
                self._end(event.handle, Event("done", text=done.text, finish_reason=done.finish_reason, usage=counts))

    def _end(self, handle: Handle, outcome: Event) -> None:
        """Take ``handle``'s job out of the batch and answer it (after /health counts it free)."""
        with self._lock:
            job, started = self._running.pop(handle)
        self._durations.append(time.perf_counter() - started)
        job.emit(outcome)

    def _drop_cancelled(self) -> None:
        for handle, (job, _) in list(self._running.items()):
            if job.cancelled:
                self._batcher.cancel(handle)
                self.counts["cancelled"] += 1
                counts = usage(len(handle.ids), len(handle.tokens))
                self._end(handle, Event("done", text=handle.text, finish_reason=None, usage=counts))

    def _drop_all(self) -> None:
        for handle, (job, _) in list(self._running.items()):
            job.cancel()
        self._drop_cancelled()

    def _fail_handles(self, handles: list[Handle], error: ApiError) -> None:
        for handle in handles:
            if handle in self._running:
                self._batcher.cancel(handle)  # frees its sequence if the batcher still holds it
                self.counts["failed"] += 1
                self._end(handle, Event("error", error=error))

    def _fail(self, job: Job, error: ApiError) -> None:
        self.counts["failed"] += 1
        job.emit(Event("error", error=error))
