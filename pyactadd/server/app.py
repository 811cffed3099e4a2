"""The FastAPI application: OpenAI-compatible endpoints with per-request steering, and the playground.

Endpoints:

* ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's bodies plus
  ``steering: [{"vector": NAME, "coeff": C, "align": ...}]``; ``stream: true`` answers
  with server-sent events (``data: {chunk}``, then ``data: [DONE]``).
* ``GET /v1/models``; ``GET /v1/steering/vectors`` (and ``/{name}``);
  ``PUT /v1/steering/vectors/{name}`` (body: a GGUF steering file) and ``DELETE``.
* ``GET /health`` (no key needed) and ``GET /`` (the playground page, static files under ``/static``).

Every failure is a JSON ``{"error": {...}}`` (see :mod:`pyactadd.server.schemas`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pyactadd.errors import ModelMismatchError, PyactaddError
from pyactadd.server.plan import Prepared, prepare
from pyactadd.server.registry import RegistryFull, VectorRegistry
from pyactadd.server.schemas import ApiError, ChatCompletionRequest, CompletionRequest, check_vector_name, param_of
from pyactadd.server.batch_worker import BatchWorker
from pyactadd.server.worker import BackendLost, Event, Job, QueueFull, QueueWorker, Worker

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server; every limit is checked before a request reaches the model."""

    model_name: str  # the id /v1/models lists and responses carry
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    queue_size: int = 8  # requests waiting behind the running ones; more get 503
    parallel: int = 1  # sequences generated together in one continuous batch (1: one request at a time)
    max_body_bytes: int = 1 << 20  # JSON request bodies
    max_upload_bytes: int = 64 << 20  # PUT /v1/steering/vectors/{name}
    # Registered vectors (files and uploads) in all, and their rows' bytes in memory; the
    # byte limit also bounds the vectors one request names (what it adds to the engine).
    max_vectors: int = 64
    max_vector_bytes: int = 512 << 20
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer KEY"
    allow_upload: bool = True
    prompt_cache: bool = False  # reuse the KV prefix between jobs with equal steering (not bit-exact)
    # Host names a request may address (None: any). On loopback this refuses DNS-rebinding
    # pages: a site whose name resolves to 127.0.0.1 still sends its own name as Host.
    allowed_hosts: tuple[str, ...] | None = ("127.0.0.1", "localhost", "::1")


def create_app(llama, registry: VectorRegistry, config: ServerConfig) -> FastAPI:
    """Build the application around a loaded Llama (with a Steering attached) and a vector registry.

    The worker thread starts and stops with the application's lifespan; it is
    ``app.state.worker``: a :class:`Worker` (one request at a time) or, with
    ``config.parallel`` above 1, a :class:`BatchWorker`.
    """
    app = FastAPI(
        title="pyactadd",
        summary="OpenAI-compatible completions with per-request ActAdd steering inside llama.cpp",
        lifespan=_lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.llama = llama
    app.state.worker = make_worker(llama, config)
    app.state.registry = registry
    app.state.config = config
    app.state.created = int(time.time())
    app.add_middleware(BodyLimit, config=config)
    # Outside the body limit and the parser: a client without the key learns nothing else.
    app.add_middleware(KeyCheck, api_key=config.api_key)
    if config.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)
    _install_error_handlers(app)
    app.get("/health")(health)
    app.include_router(_api())
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(playground)
    app.mount("/static", StaticFiles(packages=[("pyactadd.server", "static")]), name="static")
    return app


def make_worker(llama, config: ServerConfig) -> QueueWorker:
    """The worker ``config`` asks for: one request at a time, or ``config.parallel`` in one batch."""
    if config.parallel > 1:
        return BatchWorker(llama, parallel=config.parallel, queue_size=config.queue_size, prompt_cache=config.prompt_cache)
    return Worker(llama, queue_size=config.queue_size, prompt_cache=config.prompt_cache)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    worker: QueueWorker = app.state.worker
    worker.start()
    try:
        yield
    finally:
        await asyncio.to_thread(worker.stop)


def _api() -> APIRouter:
    """The /v1 routes, behind the API key check."""
    api = APIRouter(prefix="/v1")
    api.get("/models")(models)
    api.get("/steering/vectors")(list_vectors)
    api.get("/steering/vectors/{name}")(get_vector)
    api.put("/steering/vectors/{name}", status_code=201)(upload_vector)
    api.delete("/steering/vectors/{name}", status_code=204)(delete_vector)
    api.post("/completions")(completions)
    api.post("/chat/completions")(chat_completions)
    return api


async def health(request: Request) -> Any:
    """Liveness and queue state (with ``slots`` and ``slots_busy``); 503 once the model's backend
    is lost (an RPC worker died)."""
    worker: QueueWorker = request.app.state.worker
    config: ServerConfig = request.app.state.config
    if worker.lost is not None:
        return JSONResponse(
            status_code=503,
            content={"status": "unhealthy", "error": worker.lost, "model": config.model_name, "queue": worker.status()},
        )
    return {
        "status": "ok",
        "model": config.model_name,
        "queue": worker.status(),
        "auth": config.api_key is not None,
        "upload": config.allow_upload,
    }


async def models(request: Request) -> dict[str, Any]:
    """The one model this server serves."""
    state = request.app.state
    return {
        "object": "list",
        "data": [{"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "pyactadd"}],
    }


async def list_vectors(request: Request) -> dict[str, Any]:
    """The vectors a request may name, with their metadata; unusable ones say why."""
    return {"object": "list", "data": [entry.describe() for entry in request.app.state.registry.entries()]}


async def get_vector(name: str, request: Request) -> dict[str, Any]:
    """One vector's metadata."""
    entry = request.app.state.registry.get(_name_param(name))
    if entry is None:
        raise ApiError(404, f"no steering vector named {name!r}", param="name", code="unknown_vector")
    return entry.describe()


async def upload_vector(name: str, request: Request) -> dict[str, Any]:
    """Register the GGUF steering file in the body under ``name`` (replacing a vector of that name)."""
    _check_upload_allowed(request.app.state.config)
    name = _name_param(name)
    data = await request.body()
    if not data:
        raise ApiError(400, "empty body: send the bytes of a .gguf steering file", code="empty_body")
    try:
        entry = await asyncio.to_thread(request.app.state.registry.add_gguf, name, data)
    except RegistryFull as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from None
    except ModelMismatchError as exc:
        raise ApiError(400, str(exc), code="model_mismatch") from None
    except PyactaddError as exc:
        raise ApiError(400, str(exc), code="invalid_vector_file") from None
    return entry.describe()


async def delete_vector(name: str, request: Request) -> Response:
    """Remove an uploaded (or --vectors) vector."""
    _check_upload_allowed(request.app.state.config)
    if not request.app.state.registry.remove(_name_param(name)):
        raise ApiError(404, f"no steering vector named {name!r}", param="name", code="unknown_vector")
    return Response(status_code=204)


async def completions(body: CompletionRequest, request: Request):
    """``POST /v1/completions``."""
    return await _complete(body, request, chat=False)


async def chat_completions(body: ChatCompletionRequest, request: Request):
    """``POST /v1/chat/completions``."""
    return await _complete(body, request, chat=True)


async def _complete(body, request: Request, *, chat: bool):
    state = request.app.state
    # Tokenizing is quick and thread-safe in llama.cpp; a thread keeps the loop free.
    config: ServerConfig = state.config
    prepared = await asyncio.to_thread(
        prepare, state.llama, state.registry, body, max_tokens_limit=config.max_tokens, max_steering_bytes=config.max_vector_bytes
    )
    return await _answer(request, state.worker, prepared, _Shape(state.config.model_name, chat=chat, body=body))


async def playground() -> HTMLResponse:
    """The playground page."""
    static = resources.files("pyactadd.server") / "static"
    return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))


def _name_param(name: str) -> str:
    try:
        return check_vector_name(name)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="name", code="invalid_vector_name") from None


def _check_upload_allowed(config: ServerConfig) -> None:
    if not config.allow_upload:
        raise ApiError(403, "uploads are turned off on this server (--no-upload)", code="upload_disabled")


class _ClientGone(Exception):
    pass


async def _next_event(job: Job, request: Request, getter: list) -> Event:
    """The job's next event; while waiting, notice a client that hung up and cancel the job."""
    while True:
        if not getter:
            getter.append(asyncio.ensure_future(job.events.get()))
        done, _ = await asyncio.wait({getter[0]}, timeout=DISCONNECT_POLL_S)
        if done:
            return getter.pop().result()
        if await request.is_disconnected():
            job.cancel()
            getter.pop().cancel()
            raise _ClientGone


async def _answer(request: Request, worker: QueueWorker, prepared: Prepared, shape: "_Shape"):
    job = Job(prepared, stream=shape.stream, loop=asyncio.get_running_loop())
    try:
        worker.submit(job)
    except BackendLost as lost:
        raise ApiError(
            503, f"the model is unavailable: {lost.reason}; restart pyactadd serve once the workers are back", code="backend_lost"
        ) from None
    except QueueFull as full:
        raise ApiError(
            503,
            f"the server is busy ({full.waiting} requests waiting): retry after {full.retry_after} s",
            code="server_busy",
            headers={"Retry-After": str(full.retry_after)},
        ) from None
    getter: list = []
    try:
        first = await _next_event(job, request, getter)
    except _ClientGone:
        return Response(status_code=499)
    except asyncio.CancelledError:
        job.cancel()
        raise
    if first.kind == "error":
        raise first.error
    if not shape.stream:
        return JSONResponse(shape.whole(first, prepared))
    return StreamingResponse(
        _events(job, first, shape, prepared),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(job: Job, first: Event, shape: "_Shape", prepared: Prepared) -> AsyncIterator[str]:
    try:
        opening = shape.opening()
        if opening is not None:
            yield _sse(opening)
        event = first
        while True:
            if event.kind == "text":
                yield _sse(shape.chunk(event.text))
            elif event.kind == "done":
                yield _sse(shape.chunk("", finish_reason=event.finish_reason))
                if shape.include_usage:
                    yield _sse(shape.usage_chunk(event.usage))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse(event.error.payload())
                yield "data: [DONE]\n\n"
                return
            event = await job.events.get()
    finally:
        job.cancel()  # the client left mid-stream, or the job is over (then a no-op)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, model: str, *, chat: bool, body) -> None:
        self.model = model
        self.chat = chat
        self.stream = bool(body.stream)
        self.include_usage = body.include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, done: Event, prepared: Prepared) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
            body = self._head("chat.completion")
        else:
            choice = {"text": done.text, "index": 0, "logprobs": None, "finish_reason": done.finish_reason}
            body = self._head("text_completion")
        body.update(choices=[choice], usage=done.usage, steering=list(prepared.plan.described))
        return body

    def opening(self) -> dict[str, Any] | None:
        """Chat streams start with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        return self._chunk_with({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            return self._chunk_with({"content": text} if text else {}, finish_reason)
        body = self._head("text_completion")
        body["choices"] = [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]
        return body

    def _chunk_with(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        body = self._head("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return body

    def usage_chunk(self, usage: dict[str, int] | None) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage)
        return body


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and not _is_json(content_type):
            # Only JSON is parsed: a browser cannot send it cross-site without a CORS preflight.
            shown = f"got {content_type!r}" if content_type else "got none"
            error = ApiError(400, f"send the body as JSON with 'Content-Type: application/json' ({shown})", code="invalid_content_type")
            return JSONResponse(error.payload(), status_code=400)
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.payload(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        error = ApiError(500, f"internal error: {exc.__class__.__name__}", code="internal_error")
        return JSONResponse(error.payload(), status_code=500)


def _is_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON (application/json or application/*+json)."""
    kind = content_type.split(";")[0].strip().lower()
    maintype, _, subtype = kind.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


class _FieldError(ApiError):
    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def _validation_error(errors: list[dict[str, Any]]) -> _FieldError:
    """The first validation error as a 400 naming its field."""
    if not errors:
        return _FieldError(400, "invalid request body", code="invalid_request")
    # Of a union's errors ("not a string", "not a list", "a lone surrogate"), the one a
    # validator raised says what is wrong with the value actually sent.
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        return _FieldError(400, f"the body is not valid JSON: {reason}".rstrip(": "), code="invalid_json")
    param = param_of(tuple(error.get("loc", ())))
    message = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    if error.get("type") == "missing":
        message = "this field is required" if param else "the request body is empty: send a JSON object"
    elif error.get("type") == "extra_forbidden":
        message = "unknown field"
    if param is None and error.get("type") == "model_attributes_type":
        message = "the body must be a JSON object"
    text = f"{param}: {message}" if param else message
    return _FieldError(400, text, param=param, code="invalid_value" if param else "invalid_request")


class KeyCheck:
    """ASGI middleware: refuse a /v1 request without the server's API key (when it has one) with 401.

    It runs before the body is read or parsed, so a malformed body without the key is a
    401, not a 400, and nothing about the request's fields leaks to a client without it.
    """

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if self.key is None or scope["type"] != "http" or not (scope["path"] + "/").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's --api-key", code="invalid_api_key"
            )
            await JSONResponse(error.payload(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class HostCheck:
    """ASGI middleware: answer 421 to a request whose Host header is not an allowed name (any port)."""

    def __init__(self, app, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {name.lower() for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            if name not in self.allowed:
                error = ApiError(421, f"this server answers only to {', '.join(sorted(self.allowed))} (Host was {host!r})", code="misdirected_request")
                await JSONResponse(error.payload(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse a request body larger than the limit with 413, before it is parsed.

    Uploads (``PUT /v1/steering/vectors/...``) get ``max_upload_bytes``; everything else
    ``max_body_bytes``. Content-Length is checked up front; a chunked body is counted as
    it arrives.
    """

    def __init__(self, app, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "PUT" and scope["path"].startswith("/v1/steering/vectors/")
        limit = self.config.max_upload_bytes if upload else self.config.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await self._refuse(send, limit)
                return
        refused = False
        seen = 0

        async def counted_receive():
            nonlocal refused, seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not refused:
                    refused = True
                    await self._refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        error = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes", code="body_too_large")
        body = json.dumps(error.payload()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
