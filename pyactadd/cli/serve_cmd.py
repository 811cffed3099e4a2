"""``pyactadd serve``: an OpenAI-compatible server with per-request steering, and a playground page."""

from __future__ import annotations

from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import (
    apply_options,
    check_context_memory,
    gguf_model,
    is_loopback,
    model_option,
    placement_from,
    rpc_options,
    threads_option,
)

_OPTIONS = [
    model_option,
    click.option(
        "--vectors",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Folder of .gguf steering files; each is offered under its file name without .gguf (love.gguf → love).",
    ),
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default)."),
    click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port."),
    click.option(
        "--api-key",
        envvar="PYACTADD_API_KEY",
        default=None,
        help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $PYACTADD_API_KEY).",
    ),
    click.option("--queue-size", type=click.IntRange(1, 4096), default=8, show_default=True, help="Requests that may wait behind the running ones; more get 503 with Retry-After."),
    click.option(
        "--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
        help="Requests generated together in one continuous batch, each with its own steering (1: one at a time).",
    ),
    click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=1024, show_default=True, help="Largest max_tokens a request may ask for."),
    click.option("--max-body", "max_body", type=click.IntRange(1024, 1 << 30), default=1 << 20, show_default=True, help="Largest JSON request body, in bytes."),
    click.option("--max-upload", "max_upload", type=click.IntRange(1024, 1 << 32), default=64 << 20, show_default=True, help="Largest uploaded steering file, in bytes."),
    click.option(
        "--max-vectors", type=click.IntRange(1, 1 << 20), default=64, show_default=True,
        help="Most steering vectors registered at once (--vectors files and uploads); another upload gets 409.",
    ),
    click.option(
        "--max-vector-bytes", type=click.IntRange(1024, 1 << 40), default=512 << 20, show_default=True,
        help="Most bytes of vector rows held in memory (files and uploads; an upload past it gets 413), "
        "and most a request's steering may name (400).",
    ),
    click.option("--no-upload", is_flag=True, help="Refuse PUT/DELETE /v1/steering/vectors/NAME: only --vectors files are offered."),
    click.option(
        "--prompt-cache",
        is_flag=True,
        help="Reuse the KV prefix between consecutive requests with the same steering (faster on long shared prompts; "
        "outputs then may differ from `pyactadd run` in the last bits).",
    ),
    click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True, help="Context length (per request with --parallel)."),
    threads_option,
    rpc_options,
    # Set by serve itself when it restarts in place after a lost RPC worker: keep this
    # socket (the name is pyactadd.server.process.LostWorkerGuard.LISTEN_FD_OPTION).
    click.option("--listen-fd", type=click.IntRange(3, 1 << 20), default=None, hidden=True),
]


@main.command("serve")
@apply_options(_OPTIONS)
def serve_command(
    model, vectors, host, port, api_key, queue_size, parallel, max_tokens, max_body, max_upload, max_vectors, max_vector_bytes, no_upload,
    prompt_cache, n_ctx, threads, rpc, rpc_split, rpc_layers, listen_fd,
):
    """Serve the model over HTTP: OpenAI-compatible completions with per-request steering.

    \b
    Endpoints: POST /v1/completions, POST /v1/chat/completions (stream or not),
    GET /v1/models, GET /v1/steering/vectors, PUT/DELETE /v1/steering/vectors/NAME,
    GET /health, and the playground page at /.

    A request steers with a "steering" list naming vectors loaded from --vectors:

    \b
      {"prompt": "I hate you because", "max_tokens": 30,
       "steering": [{"vector": "love", "coeff": 5, "align": "front"}]}

    \b
    Examples:
      pyactadd serve --vectors ./vectors
      pyactadd serve --vectors ./vectors --port 9000 --api-key "$KEY"
      pyactadd serve --vectors ./vectors --parallel 8
      pyactadd serve --vectors ./vectors --rpc 10.0.0.2:50052,10.0.0.3:50052

    With --rpc, losing a worker fails the request in flight (502); the server then answers
    503 (and /health 503 "unhealthy") until every worker accepts connections again, and
    restarts itself in place (same port; vectors uploaded through the API are lost).
    """
    from pyactadd.runtime.generate import load_llama
    from pyactadd.server import ServerConfig, create_app, process

    _check_api_key(api_key, host)
    model_path = gguf_model(model)
    placement = placement_from(rpc, rpc_split, rpc_layers)
    if placement is None:  # with --rpc the cache lives on the workers
        if parallel == 1:
            check_context_memory(model_path, n_ctx)
        else:  # the batch has a context of n_ctx per sequence besides the model's own
            check_context_memory(model_path, n_ctx * (parallel + 1), "a total context (--n-ctx x (--parallel + 1)) of")
    guard = process.LostWorkerGuard.install(placement.endpoints) if placement is not None else None
    llama = load_llama(model_path, n_ctx=n_ctx, n_threads=threads, placement=placement)
    registry = _registry(llama, vectors, max_vectors, max_vector_bytes)
    config = ServerConfig(
        model_name=model_path.name,
        max_tokens=max_tokens,
        queue_size=queue_size,
        parallel=parallel,
        max_body_bytes=max_body,
        max_upload_bytes=max_upload,
        max_vectors=max_vectors,
        max_vector_bytes=max_vector_bytes,
        api_key=api_key,
        allow_upload=not no_upload,
        prompt_cache=prompt_cache,
        # On loopback, answer only to loopback names (refuses DNS rebinding); elsewhere any Host.
        allowed_hosts=("127.0.0.1", "localhost", "::1") if is_loopback(host) else None,
    )
    app = create_app(llama, registry, config)
    sock = process.listen(host, port, fd=listen_fd)
    if guard is not None:
        guard.arm(app.state.worker, sock)
    usable = sum(entry.usable for entry in registry.entries())
    url = process.url_of(sock)
    click.echo(
        f"pyactadd serve: {model_path.name}, {usable} steering vector(s); listening on {url} "
        f"(playground: {url}/, Ctrl+C to stop)",
        err=True,
    )
    process.run(app, sock)


def _check_api_key(api_key: str | None, host: str) -> None:
    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="--api-key")
    if not is_loopback(host) and api_key is None:
        click.secho(f"Warning: listening on {host} without --api-key: anyone who can reach it can use the model.", fg="yellow", err=True)


def _registry(llama, vectors: Path | None, max_vectors: int, max_bytes: int):
    """The model's vector registry with the --vectors folder loaded (unusable files warned about).

    The folder is the operator's: it is loaded whole even past the limits, which then
    leave no room for uploads.
    """
    from pyactadd.runtime.steering import Steering
    from pyactadd.server import VectorRegistry

    registry = VectorRegistry(Steering.of(llama).fingerprint, max_vectors=max_vectors, max_bytes=max_bytes)
    if vectors is not None:
        for entry in registry.load_dir(vectors):
            if not entry.usable:
                click.secho(f"Warning: vector {entry.name!r} cannot be used: {entry.problem}", fg="yellow", err=True)
    return registry
