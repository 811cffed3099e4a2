"""Start `pyactadd worker` processes on loopback and wait until they answer (for tests and benchmarks).

    with LocalWorkers(2) as workers:
        pyactadd run ... --rpc workers.spec

Each worker listens on 127.0.0.1 on a port the OS had free; readiness is ggml-rpc's own
handshake (:func:`pyactadd.runtime.rpc.check_listening`); every wait is bounded and
:meth:`stop` always ends the processes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from pyactadd.runtime import rpc
from pyactadd.errors import InputError


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent process ends (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (AttributeError, OSError):  # not Linux: stop() is then the only way out
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalWorkers:
    """``n`` `pyactadd worker` subprocesses on 127.0.0.1 (context manager)."""

    def __init__(self, n: int, *, threads: int = 1, startup_timeout: float = 60.0) -> None:
        """Start ``n`` workers; each also ends when this process does (Linux), even without :meth:`stop`."""
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.endpoints = [rpc.Endpoint("127.0.0.1", _free_port()) for _ in range(n)]
        self.procs: list[subprocess.Popen] = [self._spawn(ep) for ep in self.endpoints]
        for i in range(n):
            self._wait_ready(i)

    def _spawn(self, ep: rpc.Endpoint) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "pyactadd", "worker", "--port", str(ep.port), "--threads", str(self.threads)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def _wait_ready(self, i: int) -> None:
        ep, proc = self.endpoints[i], self.procs[i]
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                rpc.check_listening([ep], timeout=5)
                return
            except InputError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pyactadd worker on {ep} did not start within {self.startup_timeout:.0f} s") from None
                time.sleep(0.2)

    @property
    def spec(self) -> str:
        """The ``--rpc`` value: ``HOST:PORT,HOST:PORT``."""
        return ",".join(str(ep) for ep in self.endpoints)

    def kill(self, i: int) -> None:
        """Kill worker ``i`` at once (SIGKILL), as a crash or a lost host would."""
        self.procs[i].kill()
        self.procs[i].wait(10)

    def restart(self, i: int) -> None:
        """Start worker ``i`` again on its port (after :meth:`kill`) and wait until it answers."""
        self.procs[i] = self._spawn(self.endpoints[i])
        self._wait_ready(i)

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after 10 s)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> "LocalWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
