"""Run ``pyactadd serve`` in a subprocess on loopback and wait until it listens (for tests and benchmarks).

    with ServerProcess("--vectors", "vecs", "--threads", "1") as server:
        urllib.request.urlopen(server.url + "/health")

The server binds 127.0.0.1 on a port the OS picks (``--port 0``) and prints the address
once it listens; every wait here is bounded and :meth:`stop` always ends the process.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Sequence
from urllib.parse import urlsplit

READY = re.compile(r"listening on (http://[^\s/]+)")
_LAUNCH = "import sys; from pyactadd.cli import main; sys.exit(main())"


class ServerProcess:
    """A ``pyactadd serve`` subprocess bound to 127.0.0.1 (context manager)."""

    def __init__(self, *args: str, startup_timeout: float = 180.0, env: dict[str, str] | None = None) -> None:
        self.args: Sequence[str] = args
        self.startup_timeout = startup_timeout
        self.env = env
        self.url: str | None = None
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._process: subprocess.Popen | None = None

    @property
    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return "".join(self._lines)

    def start(self) -> "ServerProcess":
        """Start the server and wait until it listens.

        Raises:
            RuntimeError: it exited or did not listen within ``startup_timeout`` (the message holds its log).
        """
        command = [sys.executable, "-c", _LAUNCH, "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        threading.Thread(target=self._read, name="pyactadd-serve-log", daemon=True).start()
        if not self._ready.wait(self.startup_timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"pyactadd serve did not start within {self.startup_timeout:.0f} s:\n{self.log}")
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            self._lines.append(line)
            match = READY.search(line)
            if match and self.url is None:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # exited: wake start()

    @property
    def pid(self) -> int | None:
        """The server's process id (for reading its memory in /proc)."""
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """Ask the server to shut down (SIGINT), kill it if it lingers; return its exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def request(url: str, method: str, path: str, body=None, headers=None, timeout: float = 180):
    """One raw HTTP request; returns (status, headers, parsed JSON or raw bytes)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=payload, headers={k: v for k, v in sent.items() if v is not None})
        response = connection.getresponse()
        data = response.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        connection.close()
