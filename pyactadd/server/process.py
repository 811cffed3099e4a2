"""The serving process: its listening socket, the uvicorn loop, and the restart in place
after a lost RPC worker.

``pyactadd serve`` parses its options and calls these; the process-level behaviour (which
socket, how the process replaces itself) lives here, where tests and other front ends can
reach it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Sequence

from pyactadd.errors import InputError
from pyactadd.runtime import rpc


def listen(host: str, port: int, *, fd: int | None = None) -> socket.socket:
    """A listening TCP socket: bound here (``port`` 0 lets the OS pick), or the inherited ``fd``.

    Binding before serving lets the caller report the real port, and lets a restart keep
    the socket (connections made meanwhile wait in its backlog).

    Raises:
        InputError: the address cannot be bound.
    """
    if fd is not None:
        return socket.socket(fileno=fd)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a listening socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run(app, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until Ctrl+C or SIGTERM; access logs only with ``-v``."""
    import uvicorn

    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    config = uvicorn.Config(
        app, log_level="info" if verbose else "warning", access_log=verbose, timeout_graceful_shutdown=5, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])


class LostWorkerGuard:
    """What serve does when an RPC worker dies: fail, turn unhealthy, and come back.

    ggml-rpc aborts on its own thread when a worker goes away; this handler runs there
    instead. It must not return (ggml would abort the process) and llama.cpp's thread stays
    blocked in the lost call, so the model cannot be used again in this process. It fails
    the request in flight (502) and the queued ones (503), the server answers 503 and
    /health "unhealthy", and a watchdog waits until every worker accepts connections again,
    then restarts this same process (exec, same PID) on the same listening socket, which
    reloads the model; connections made meanwhile wait in the socket's backlog.

    :meth:`install` it before the model loads (a worker lost while loading ends the process
    with one error line); :meth:`arm` it once the server's worker and socket exist.
    """

    RETRY_S = 1.0
    # The option that hands the listening socket to the restarted process.
    LISTEN_FD_OPTION = "--listen-fd"

    def __init__(self, endpoints: Sequence[rpc.Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self.worker = None  # the server's Worker, once there is one
        self.listen_fd: int | None = None

    @classmethod
    def install(cls, endpoints: Sequence[rpc.Endpoint]) -> "LostWorkerGuard":
        """A guard for ``endpoints``, installed as ggml-rpc's lost-worker handler."""
        guard = cls(endpoints)
        rpc.on_lost_worker(lambda message: guard(rpc.lost_worker_message(message)))
        return guard

    def arm(self, worker, sock: socket.socket) -> None:
        """From now on a lost worker makes ``worker`` unhealthy and restarts onto ``sock``."""
        self.worker, self.listen_fd = worker, sock.fileno()

    def __call__(self, message: str) -> None:
        if self.worker is None or self.listen_fd is None:  # lost while loading: nothing to keep
            _say(f"Error: {message}")
            os._exit(1)
        _say(f"Error: {message}; answering 503 until every worker is back, then restarting")
        self.worker.lose_backend(message)
        threading.Thread(target=self._restart_when_back, name="pyactadd-rpc-watchdog", daemon=True).start()
        threading.Event().wait()

    def _restart_when_back(self) -> None:
        # A plain TCP connect, not ggml-rpc's handshake: a surviving worker is still busy
        # with this process's old connection until the exec below closes it.
        while not all(accepts(ep) for ep in self.endpoints):
            time.sleep(self.RETRY_S)
        _say("pyactadd serve: every RPC worker accepts connections again; restarting to reload the model")
        restart_in_place(self.listen_fd, self.LISTEN_FD_OPTION)


def accepts(endpoint: rpc.Endpoint, timeout: float = 2.0) -> bool:
    """Whether ``endpoint`` accepts a TCP connection."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return True
    except OSError:
        return False


def restart_in_place(fd: int, option: str) -> None:
    """Replace this process by a fresh run of the same command (same PID), handing it the
    listening socket ``fd`` as ``option FD``. Does not return."""
    os.set_inheritable(fd, True)
    # Close everything else, ggml-rpc's sockets included: the new image must not keep
    # the surviving workers busy with connections it knows nothing about.
    os.closerange(3, fd)
    os.closerange(fd + 1, max(fd + 1, os.sysconf("SC_OPEN_MAX")))
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:], option, str(fd)])


def _say(line: str) -> None:
    # Runs on ggml-rpc's thread with the process about to exit or exec: write it now.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
