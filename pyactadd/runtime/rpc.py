"""Model layers on other machines through llama.cpp's own RPC backend (ggml-rpc).

pyactadd adds no protocol of its own. ``pyactadd worker`` is ggml's RPC server
(``ggml_backend_rpc_start_server``); a client registers each worker with
``ggml_backend_rpc_add_server`` and hands the workers' ggml devices to
``llama_model_params.devices``, as llama.cpp's ``--rpc`` does. The steering engine needs
nothing special: a layer output that lives in an RPC buffer takes its non-host path
(``ggml_backend_tensor_get``/``set``), the path CUDA and Metal buffers take.

Everything is checked here before crossing into C: ggml-rpc aborts the process when it
cannot parse an endpoint, connect or complete a handshake, and when a worker dies
mid-graph. :func:`on_lost_worker` turns those aborts into a caller-chosen outcome (one
error line and exit for ``run``; an unhealthy server for ``serve``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import signal
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from pyactadd.errors import InputError, InstallError
from pyactadd.native import default_threads, llama_cpp_module, llama_cpp_python_pin

_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type
_DEVICE_TYPE_GPU = 1
SECURITY_NOTE = "ggml-rpc has no authentication or encryption: run workers only on a trusted network"


@dataclass(frozen=True)
class Endpoint:
    """One worker address: an IPv4 address or host name, and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT`` → :class:`Endpoint`; raises InputError naming the bad part.

    ggml-rpc splits at the first colon, so IPv6 literals cannot be expressed; use a host name.
    """
    if text.count(":") > 1 or "[" in text:
        raise InputError(f"RPC worker address {text!r}: ggml-rpc takes no IPv6 literals; use an IPv4 address or a host name")
    host, sep, port = text.strip().partition(":")
    if not sep or not host or not port:
        raise InputError(f"RPC worker address {text!r} is not HOST:PORT (e.g. 127.0.0.1:50052)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"RPC worker address {text!r}: port {port!r} is not a number from 1 to 65535")
    return Endpoint(host, int(port))


def parse_endpoints(spec: str) -> list[Endpoint]:
    """``HOST:PORT[,HOST:PORT…]`` → endpoints, in order, without duplicates."""
    endpoints = [parse_endpoint(part) for part in spec.split(",") if part.strip()]
    if not endpoints:
        raise InputError("--rpc needs at least one HOST:PORT")
    seen = set()
    for ep in endpoints:
        if ep in seen:
            raise InputError(f"RPC worker {ep} is listed twice in --rpc")
        seen.add(ep)
    return endpoints


def parse_split(spec: str | None, n_workers: int) -> list[float] | None:
    """``W1,W2,…`` (one weight per worker, any positive scale) → proportions; None → even."""
    if spec is None:
        return None
    try:
        weights = [float(part) for part in spec.split(",")]
    except ValueError:
        raise InputError(f"--rpc-split {spec!r} is not a comma-separated list of numbers (e.g. 1,3)") from None
    if len(weights) != n_workers:
        raise InputError(f"--rpc-split has {len(weights)} weight(s) for {n_workers} worker(s) in --rpc: give one per worker")
    if any(not (w >= 0) or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise InputError(f"--rpc-split {spec!r}: weights must be finite, >= 0, and not all 0")
    total = sum(weights)
    return [w / total for w in weights]


# ggml-rpc's handshake (ggml-rpc.cpp, protocol 7): the client sends the HELLO command
# byte, a little-endian u64 request size and its transport capabilities; the server
# answers with a u64 size, its version (major, minor, patch, pad) and its capabilities.
_RPC_CMD_HELLO = 14
_RPC_CONN_CAPS_SIZE = 24
_RPC_PROTO_MAJOR = 7


def check_listening(endpoints: Sequence[Endpoint], *, timeout: float = 5.0) -> None:
    """Raise InputError naming the first endpoint that is not a free, compatible ggml RPC worker.

    ggml-rpc aborts the process when a connect or handshake fails, and waits forever on a
    worker that is busy with another client (it serves one at a time); this probe, one
    HELLO exchange per worker, turns each of those into one line.
    """
    for ep in endpoints:
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise InputError(
                f"no RPC worker is listening at {ep} ({reason}): start one there with "
                f"`pyactadd worker --host {ep.host} --port {ep.port}`"
            ) from None
        with sock:
            try:
                sock.sendall(bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", _RPC_CONN_CAPS_SIZE) + bytes(_RPC_CONN_CAPS_SIZE))
                size = struct.unpack("<Q", _recv_exact(sock, 8))[0]
                reply = _recv_exact(sock, size) if 4 <= size <= 4096 else b""
            except socket.timeout:
                raise InputError(
                    f"the RPC worker at {ep} did not answer within {timeout:g} s: a worker serves one client at a time; "
                    "is another client connected to it?"
                ) from None
            except OSError as exc:
                raise InputError(f"the RPC worker at {ep} closed the connection ({exc.strerror or exc}): is it a ggml RPC worker?") from None
        if len(reply) < 4:
            raise InputError(f"{ep} did not answer like a ggml RPC worker: is something else listening on that port?")
        if reply[0] != _RPC_PROTO_MAJOR:
            raise InputError(
                f"the RPC worker at {ep} speaks ggml-rpc protocol {reply[0]}.{reply[1]}, this build speaks {_RPC_PROTO_MAJOR}.x: "
                "run `pyactadd worker` (or llama.cpp's rpc-server) from the same llama.cpp version on both sides"
            )


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(104, "connection closed by the worker")
        data += chunk
    return data


@dataclass(frozen=True)
class _Ggml:
    """The few ggml functions this module calls, bound from the library llama_cpp loaded."""

    lib: ctypes.CDLL
    add_server: Callable[[bytes], int]
    start_server: Callable[..., None]


@functools.lru_cache(maxsize=None)
def _ggml() -> _Ggml:
    llama_cpp_module()  # version check, and loads libggml the way llama_cpp does
    from llama_cpp import _ggml as ggml_mod

    lib = ggml_mod.libggml
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    for name, argtypes, restype in (
        ("ggml_backend_reg_by_name", [cp], vp),
        ("ggml_backend_reg_get_proc_address", [vp, cp], vp),
        ("ggml_backend_reg_dev_count", [vp], sz),
        ("ggml_backend_reg_dev_get", [vp, sz], vp),
        ("ggml_backend_dev_count", [], sz),
        ("ggml_backend_dev_get", [sz], vp),
        ("ggml_backend_dev_type", [vp], ctypes.c_int),
        ("ggml_backend_dev_name", [vp], cp),
        ("ggml_backend_dev_description", [vp], cp),
        ("ggml_set_abort_callback", [vp], vp),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise InstallError(
            "this llama-cpp-python was built without ggml's RPC backend: reinstall it with CMAKE_ARGS=\"-DGGML_RPC=on\" "
            "(the README's install command does), then reinstall pyactadd"
        )
    add = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    start = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_start_server")
    if not add or not start:
        raise InstallError(
            "ggml's RPC backend lacks ggml_backend_rpc_add_server/start_server: "
            f"reinstall llama-cpp-python=={llama_cpp_python_pin()} with scripts/install-llama-cpp-python.sh"
        )
    return _Ggml(
        lib=lib,
        add_server=ctypes.CFUNCTYPE(vp, cp)(add),
        start_server=ctypes.CFUNCTYPE(None, cp, cp, sz, sz, ctypes.POINTER(vp))(start),
    )


# --- client side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a model's layers go: the workers, each worker's share, and how many layers leave this host.

    ``split``: one proportion per worker (None: llama.cpp's default, by free memory).
    ``layers``: the number of repeating layers placed on the workers, counted from the
    last (llama.cpp's n_gpu_layers); None places all of them and the output layer.
    """

    endpoints: tuple[Endpoint, ...]
    split: tuple[float, ...] | None = None
    layers: int | None = None

    @classmethod
    def parse(cls, rpc: str, split: str | None = None, layers: int | None = None) -> "Placement":
        """From the CLI's ``--rpc``, ``--rpc-split`` and ``--rpc-layers`` values (raises InputError)."""
        endpoints = parse_endpoints(rpc)
        shares = parse_split(split, len(endpoints))
        if layers is not None and layers < 0:
            raise InputError(f"--rpc-layers must be >= 0, got {layers}")
        return cls(tuple(endpoints), tuple(shares) if shares else None, layers)

    def llama_kwargs(self, devices_per_worker: Sequence[int]) -> dict:
        """``Llama(...)`` keyword arguments: n_gpu_layers, and tensor_split over every device."""
        kwargs: dict = {"n_gpu_layers": -1 if self.layers is None else self.layers}
        if self.split is not None:
            kwargs["tensor_split"] = [share / n for share, n in zip(self.split, devices_per_worker) for _ in range(n)]
        return kwargs


_connected: set[Endpoint] = set()  # ggml-rpc keeps these connections until the process exits


def worker_devices(endpoints: Sequence[Endpoint]) -> list[list[int]]:
    """Connect to each worker (checked first) and return its ggml devices, one list per worker."""
    # A worker this process already uses is busy with this very process: probing it would time out.
    check_listening([ep for ep in endpoints if ep not in _connected])
    if not _installed:
        on_lost_worker(exit_with_error)
    g = _ggml()
    devices: list[list[int]] = []
    for ep in endpoints:
        reg = g.add_server(str(ep).encode())
        count = g.lib.ggml_backend_reg_dev_count(reg) if reg else 0
        if count == 0:
            raise InputError(f"the RPC worker at {ep} offers no device: check the worker's log")
        devices.append([g.lib.ggml_backend_reg_dev_get(reg, i) for i in range(count)])
        _connected.add(ep)
    return devices


@contextlib.contextmanager
def placed(placement: Placement) -> Iterator[dict]:
    """Connect to the workers; inside the block, ``Llama(**kwargs, **extra)`` puts the layers on them.

    Yields the extra ``Llama`` keyword arguments (n_gpu_layers, tensor_split).
    """
    per_worker = worker_devices(placement.endpoints)
    with model_devices([d for devices in per_worker for d in devices]):
        yield placement.llama_kwargs([len(devices) for devices in per_worker])


_load_lock = threading.Lock()


class model_devices:
    """Context manager: models loaded inside it use exactly ``devices`` (``llama_model_params.devices``).

    llama-cpp-python's ``Llama`` does not expose the devices field, so while the block
    runs, the one function it calls to load a model gets the array set on its params;
    nothing else is changed, and the original is restored on exit.
    """

    def __init__(self, devices: Sequence[int]) -> None:
        self._array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)

    def __enter__(self) -> "model_devices":
        from llama_cpp import _internals

        _load_lock.acquire()
        raw = _internals.llama_cpp
        self._raw, self._original = raw, raw.llama_model_load_from_file
        array = self._array

        def load(path_model, params):
            params.devices = ctypes.cast(array, ctypes.c_void_p)
            try:
                return self._original(path_model, params)
            finally:
                params.devices = None  # the array dies with this object; llama.cpp copied it

        raw.llama_model_load_from_file = load
        return self

    def __exit__(self, *exc) -> None:
        self._raw.llama_model_load_from_file = self._original
        _load_lock.release()


# --- lost workers ----------------------------------------------------------------------

_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_installed: list = []  # keeps the ctypes callback alive while ggml holds its address


def is_rpc_failure(message: str) -> bool:
    """True for ggml aborts raised by ggml-rpc (a lost, refused or incompatible worker)."""
    return "ggml-rpc" in message or "RPC server" in message or "Failed to connect to" in message


def on_lost_worker(handler: Callable[[str], None]) -> None:
    """Call ``handler(message)`` instead of aborting when ggml-rpc loses a worker.

    ggml calls abort() when the callback returns, so ``handler`` must not return: exit
    the process (``os._exit``) or block the calling thread for good. It runs on ggml-rpc's
    own dispatcher thread; the thread that called llama_decode stays blocked. Other ggml
    aborts (genuine bugs) are printed as ggml would and still abort.
    """
    import sys

    def callback(raw: bytes) -> None:
        message = (raw or b"").decode("utf-8", "replace").strip()
        if is_rpc_failure(message):
            handler(message)
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    cb = _ABORT_CALLBACK(callback)
    _ggml().lib.ggml_set_abort_callback(ctypes.cast(cb, ctypes.c_void_p))
    _installed[:] = [cb]


def _without_location(message: str) -> str:
    """ggml's ``file:line: text`` → ``text``."""
    head, sep, tail = message.partition(": ")
    return tail.strip() if sep and ".c" in head else message.strip()


def lost_worker_message(message: str) -> str:
    """The one line a user sees when a worker goes away."""
    return f"lost an RPC worker ({_without_location(message)}): check that every `pyactadd worker` named in --rpc is running"


def exit_with_error(message: str) -> None:
    """A :func:`on_lost_worker` handler for commands: one ``Error:`` line, exit status 1, at once."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.write(f"\nError: {lost_worker_message(message)}\n")
    sys.stderr.flush()
    os._exit(1)


# --- worker side -----------------------------------------------------------------------


def worker_backends() -> list[tuple[int, str]]:
    """The local devices a worker offers: every GPU when there is one, else the CPU."""
    lib = _ggml().lib
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    # RPC devices registered in this process are remote; a worker never re-exports them.
    gpus = [d for d in devices if lib.ggml_backend_dev_type(d) == _DEVICE_TYPE_GPU and not lib.ggml_backend_dev_name(d).startswith(b"RPC")]
    chosen = gpus or [d for d in devices if lib.ggml_backend_dev_type(d) == _DEVICE_TYPE_CPU][:1]
    if not chosen:
        raise InstallError("ggml reports no CPU or GPU device to serve")
    return [(d, f"{lib.ggml_backend_dev_name(d).decode()} ({lib.ggml_backend_dev_description(d).decode()})") for d in chosen]


def check_can_listen(host: str, port: int) -> None:
    """Raise InputError when (host, port) cannot be bound (ggml would only print a line and return)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port or --host") from None


def serve(endpoint: Endpoint, devices: Sequence[int], *, threads: int, cache_dir: str | None = None) -> None:
    """Run ggml's RPC server on ``endpoint`` with ``devices`` (from :func:`worker_backends`) until
    the process ends (blocks the calling thread).

    Returns only when ggml gives up (it prints why), e.g. when the port cannot be bound.
    """
    array = (ctypes.c_void_p * len(devices))(*devices)
    _ggml().start_server(str(endpoint).encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), array)



def run_worker(endpoint: Endpoint, devices: Sequence[int], *, threads: int | None = None, cache_dir: str | None = None) -> str:
    """Serve as a worker until stopped; returns why it ended: ``"stopped"`` (SIGTERM) or
    ``"gave up"`` (ggml's server returned; it printed why). Ctrl+C raises KeyboardInterrupt.

    ggml's server loop never returns while it serves, so it runs on a daemon thread and
    the calling (main) thread waits, free to take Ctrl+C and SIGTERM. After this returns
    the ggml thread may still be blocked in accept(): end the process with ``os._exit``.
    """
    ended = threading.Event()
    gave_up: list[bool] = []

    def serving() -> None:
        try:
            serve(endpoint, devices, threads=threads or default_threads(), cache_dir=cache_dir)
        finally:
            gave_up.append(True)
            ended.set()

    signal.signal(signal.SIGTERM, lambda *_: ended.set())
    threading.Thread(target=serving, name="ggml-rpc-server", daemon=True).start()
    while not ended.wait(0.5):
        pass
    return "gave up" if gave_up else "stopped"
