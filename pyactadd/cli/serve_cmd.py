"""``pyactadd serve``: an OpenAI-compatible server with per-request steering, and a playground page."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import is_loopback, model_option, placement_from, rpc_options


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


class _LostWorkerGuard:
    """What serve does when an RPC worker dies: fail, turn unhealthy, and come back.

    ggml-rpc aborts on its own thread when a worker goes away; this handler runs there
    instead. It must not return (ggml would abort the process) and llama.cpp's thread stays
    blocked in the lost call, so the model cannot be used again in this process. It fails
    the request in flight (502) and the queued ones (503), the server answers 503 and
    /health "unhealthy", and a watchdog waits until every worker accepts connections again,
    then restarts this same process (exec, same PID) on the same listening socket, which
    reloads the model; connections made meanwhile wait in the socket's backlog.
    """

    RETRY_S = 1.0

    def __init__(self, endpoints) -> None:
        self.endpoints = list(endpoints)
        self.worker = None  # the server's Worker, once there is one
        self.listen_fd: int | None = None

    def __call__(self, message: str) -> None:
        import os
        import threading

        if self.worker is None or self.listen_fd is None:  # lost while loading: nothing to keep
            click.echo(f"Error: {message}", err=True)
            os._exit(1)
        click.echo(f"Error: {message}; answering 503 until every worker is back, then restarting", err=True)
        self.worker.lose_backend(message)
        threading.Thread(target=self._restart_when_back, name="pyactadd-rpc-watchdog", daemon=True).start()
        threading.Event().wait()

    def _restart_when_back(self) -> None:
        import os
        import sys
        import time

        # A plain TCP connect, not ggml-rpc's handshake: a surviving worker is still busy
        # with this process's old connection until the exec below closes it.
        while not all(self._accepts(ep) for ep in self.endpoints):
            time.sleep(self.RETRY_S)
        click.echo("pyactadd serve: every RPC worker accepts connections again; restarting to reload the model", err=True)
        fd = self.listen_fd
        os.set_inheritable(fd, True)
        # Close everything else, ggml-rpc's sockets included: the new image must not keep
        # the surviving workers busy with connections it knows nothing about.
        os.closerange(3, fd)
        os.closerange(fd + 1, max(fd + 1, os.sysconf("SC_OPEN_MAX")))
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:], "--listen-fd", str(fd)])

    @staticmethod
    def _accepts(ep) -> bool:
        try:
            with socket.create_connection((ep.host, ep.port), timeout=2):
                return True
        except OSError:
            return False


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
# Set by serve itself when it restarts in place after a lost RPC worker: keep this socket.
@click.option("--listen-fd", type=click.IntRange(3, 1 << 20), default=None, hidden=True)
@click.pass_context
def serve_command(
    ctx, model, vectors, host, port, api_key, queue_size, max_tokens, max_body, max_upload, no_upload, prompt_cache, n_ctx, threads,
    rpc, rpc_split, rpc_layers, listen_fd,
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

    With --rpc, losing a worker fails the request in flight (502); the server then answers
    503 (and /health 503 "unhealthy") until every worker accepts connections again, and
    restarts itself in place (same port; vectors uploaded through the API are lost).
    """
    import logging

    import uvicorn

    from pyactadd.default_model import resolve_model
    from pyactadd.runtime.generate import load_llama
    from pyactadd.server import ServerConfig, VectorRegistry, create_app
    from pyactadd.runtime.steering import Steering

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="--api-key")
    if not is_loopback(host) and api_key is None:
        click.secho(f"Warning: listening on {host} without --api-key: anyone who can reach it can use the model.", fg="yellow", err=True)
    model_path = resolve_model(model)
    if not model_path.is_file():
        raise click.BadParameter(f"{model_path} is not a GGUF file (llama.cpp runs GGUF models)", param_hint="--model")
    placement = placement_from(rpc, rpc_split, rpc_layers)
    guard = None
    if placement is not None:
        from pyactadd.runtime import rpc as rpc_backend

        guard = _LostWorkerGuard(placement.endpoints)
        rpc_backend.on_lost_worker(lambda message: guard(rpc_backend.lost_worker_message(message)))
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
        allowed_hosts=("127.0.0.1", "localhost", "::1") if is_loopback(host) else None,
    )
    app = create_app(llama, registry, config)
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else _bind(host, port)
    if guard is not None:
        guard.worker, guard.listen_fd = app.state.worker, sock.fileno()
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
