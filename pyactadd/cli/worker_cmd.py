"""``pyactadd worker``: ggml's own RPC server, holding model layers for `run --rpc` / `serve --rpc` elsewhere."""

from __future__ import annotations

import os

import click

from pyactadd.cli import main
from pyactadd.cli.params import is_loopback


@main.command("worker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="TCP port (llama.cpp's rpc-server default).")
@click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads for the layers it computes (default: all cores, at most 8).")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help="Keep received weights in this folder, so a restarted client uploads them again only when they changed.",
)
def worker_command(host, port, threads, cache_dir):
    """Hold a share of a model's layers for a pyactadd (or llama.cpp) client on another host.

    This is llama.cpp's RPC server (ggml_backend_rpc_start_server), started from
    pyactadd's own llama.cpp build; clients connect with `pyactadd run --rpc HOST:PORT`
    or `pyactadd serve --rpc HOST:PORT` and steer exactly as on one machine. It computes
    on every GPU ggml finds, else on the CPU. One client at a time; Ctrl+C stops it.

    ggml-rpc has no authentication or encryption: anyone who can reach the port can run
    graphs and read memory through it. Keep it on loopback or a trusted network.

    \b
    Examples:
      pyactadd worker --port 50052
      pyactadd worker --host 10.0.0.2 --port 50052 --threads 8
    """
    from pyactadd.native import default_threads
    from pyactadd.runtime import rpc

    endpoint = rpc.parse_endpoint(f"{host}:{port}")
    if not is_loopback(host):
        click.secho(f"Warning: listening on {host}: {rpc.SECURITY_NOTE}.", fg="yellow", err=True)
    rpc.check_can_listen(host, port)
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    backends = rpc.worker_backends()
    n_threads = threads or default_threads()
    click.echo(
        f"pyactadd worker: listening on {endpoint} with {', '.join(label for _, label in backends)}, "
        f"{n_threads} thread(s) (Ctrl+C to stop)",
        err=True,
    )
    try:
        ended = rpc.run_worker(endpoint, [d for d, _ in backends], threads=n_threads, cache_dir=cache_dir)
    except KeyboardInterrupt:
        click.echo("pyactadd worker: stopped.", err=True)
        os._exit(130)
    if ended == "gave up":
        click.echo(f"Error: ggml's RPC server on {endpoint} stopped (its reason is printed above)", err=True)
        os._exit(1)
    click.echo("pyactadd worker: stopped.", err=True)
    # The ggml server thread may be blocked in accept(); leave without joining it.
    os._exit(0)
