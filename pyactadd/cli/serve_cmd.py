"""``pyactadd serve``: an OpenAI-compatible server with per-request steering, and a playground page."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import click

from . import main
from .params import model_option, placement_from, rpc_options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind and listen before serving, so --port 0 can report the port the OS picked."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _lose_backend(workers: list, message: str) -> None:
    """The lost-worker handler of serve: fail the request in flight, turn unhealthy, keep answering.

    It runs on ggml-rpc's thread and must not return (ggml would abort the process), so it
    parks that thread for good; llama.cpp's own thread stays blocked with it.
    """
    import os
    import threading

    if not workers:  # lost while loading, before there was a server to keep
        click.echo(f"Error: {message}", err=True)
        os._exit(1)
    click.echo(f"Error: {message}; answering 503 until restarted", err=True)
    workers[0].lose_backend(message)
    threading.Event().wait()


@main.command("serve")
@model_option
@click.option(
    "--vectors",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder of .gguf steering files; each is offered under its file name without .gguf (love.gguf → love).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option(
    "--api-key",
    envvar="PYACTADD_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $PYACTADD_API_KEY).",
)
@click.option("--queue-size", type=click.IntRange(1, 4096), default=8, show_default=True, help="Requests that may wait behind the running one; more get 503 with Retry-After.")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=1024, show_default=True, help="Largest max_tokens a request may ask for.")
@click.option("--max-body", "max_body", type=click.IntRange(1024, 1 << 30), default=1 << 20, show_default=True, help="Largest JSON request body, in bytes.")
@click.option("--max-upload", "max_upload", type=click.IntRange(1024, 1 << 32), default=64 << 20, show_default=True, help="Largest uploaded steering file, in bytes.")
@click.option("--no-upload", is_flag=True, help="Refuse PUT/DELETE /v1/steering/vectors/NAME: only --vectors files are offered.")
@click.option(
    "--prompt-cache",
    is_flag=True,
    help="Reuse the KV prefix between consecutive requests with the same steering (faster on long shared prompts; "
    "outputs then may differ from `pyactadd run` in the last bits).",
)
@click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True, help="Context length.")
@click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads (default: all cores, at most 8).")
@rpc_options
@click.pass_context
def serve_command(
    ctx, model, vectors, host, port, api_key, queue_size, max_tokens, max_body, max_upload, no_upload, prompt_cache, n_ctx, threads,
    rpc, rpc_split, rpc_layers,
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
      pyactadd serve --vectors ./vectors --rpc 10.0.0.2:50052,10.0.0.3:50052

    With --rpc, losing a worker fails the request in flight (502), and the server then
    answers 503 (and /health 503 "unhealthy") until it is restarted.
    """
    import logging

    import uvicorn

    from ..default_model import resolve_model
    from ..generate import load_llama
    from ..server import ServerConfig, VectorRegistry, create_app
    from ..steering import Steering

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="--api-key")
    if not _is_loopback(host) and api_key is None:
        click.secho(f"Warning: listening on {host} without --api-key: anyone who can reach it can use the model.", fg="yellow", err=True)
    model_path = resolve_model(model)
    if not model_path.is_file():
        raise click.BadParameter(f"{model_path} is not a GGUF file (llama.cpp runs GGUF models)", param_hint="--model")
    placement = placement_from(rpc, rpc_split, rpc_layers)
    lost_worker: list = []
    if placement is not None:
        from .. import rpc as rpc_backend

        rpc_backend.on_lost_worker(lambda message: _lose_backend(lost_worker, rpc_backend.lost_worker_message(message)))
    llama = load_llama(model_path, n_ctx=n_ctx, n_threads=threads, placement=placement)
    registry = VectorRegistry(Steering.of(llama).fingerprint)
    if vectors is not None:
        for entry in registry.load_dir(vectors):
            if not entry.usable:
                click.secho(f"Warning: vector {entry.name!r} cannot be used: {entry.problem}", fg="yellow", err=True)
    config = ServerConfig(
        model_name=model_path.name,
        max_tokens=max_tokens,
        queue_size=queue_size,
        max_body_bytes=max_body,
        max_upload_bytes=max_upload,
        api_key=api_key,
        allow_upload=not no_upload,
        prompt_cache=prompt_cache,
        # On loopback, answer only to loopback names (refuses DNS rebinding); elsewhere any Host.
        allowed_hosts=("127.0.0.1", "localhost", "::1") if _is_loopback(host) else None,
    )
    app = create_app(llama, registry, config)
    lost_worker.append(app.state.worker)
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    usable = sum(entry.usable for entry in registry.entries())
    click.echo(
        f"pyactadd serve: {model_path.name}, {usable} steering vector(s); listening on http://{shown}:{bound_port} "
        f"(playground: http://{shown}:{bound_port}/, Ctrl+C to stop)",
        err=True,
    )
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="info" if verbose else "warning",
            access_log=verbose,
            timeout_graceful_shutdown=5,
            lifespan="on",
        )
    )
    server.run(sockets=[sock])
