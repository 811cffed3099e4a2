"""Writing files so that a reader never sees half of one, and error text on one line.

Every output pyactadd writes (steering files, tensor files, sweep results, model caches)
goes through :func:`atomic_write`: an interrupted or failed write leaves the old file, or
none, never a partial one. A process killed outright (SIGKILL, power loss) cannot remove
its temporary file, so temporary names carry the writer's process id and
:func:`remove_stale_temps` lets the next run delete those whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from pyactadd.errors import PyactaddError, SteeringFileError

_TEMP_SUFFIX = re.compile(r"\.(\d+)-[0-9a-f]+\.tmp$", re.ASCII)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_NEARLY_FULL_BYTES = 1 << 20  # what a write that stopped short leaves free, at most


def temp_path(target: Path) -> Path:
    """A hidden, unique temporary name beside ``target`` (same directory, so rename is atomic).

    The name ends in ``.<pid>-<random>.tmp``: :func:`remove_stale_temps` reads the pid back.
    """
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(8)}.tmp")


def owner_pid(path: str | os.PathLike[str]) -> int | None:
    """The process id in a :func:`temp_path` name, or None for any other name."""
    match = _TEMP_SUFFIX.search(Path(path).name)
    return int(match.group(1)) if match else None


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike[str], pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temporary files and folders in ``directory`` whose writer has died.

    Only entries matching the glob ``pattern`` whose name carries a pid (a
    :func:`temp_path` name) are considered, and only those whose process no longer exists
    are removed: a write still under way in another process is left alone. Errors while
    removing are ignored (another process may be removing the same leftover).

    Returns:
        The paths removed.
    """
    removed = []
    for entry in sorted(Path(directory).glob(pattern)):
        pid = owner_pid(entry)
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold Ctrl-C during a C call that cannot be interrupted, and raise it once the call returns.

    A SIGINT that arrives while llama.cpp runs is otherwise delivered inside one of
    llama-cpp-python's ctypes log callbacks, where the KeyboardInterrupt is printed as
    "Exception ignored" and lost. Outside the main thread (where Python handles no
    signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if caught:
        raise KeyboardInterrupt


def atomic_write(target: Path, write: Callable[[Path], None], *, error: type[PyactaddError] = SteeringFileError) -> None:
    """Call ``write(temp)`` for a temporary file beside ``target``, then rename it over ``target``.

    The temporary file is removed on any failure, Ctrl-C included.

    Raises:
        error: the write or the rename failed (OSError and unexpected exceptions, one line).
    """
    target = Path(target)
    temp = temp_path(target)
    try:
        write(temp)
        with open(temp, "r+b") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        # Measured before the temporary file goes: deleting it frees the space again.
        reason = write_failure(target, exc) if isinstance(exc, Exception) else None
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        if reason is None or (isinstance(exc, PyactaddError) and not reason.startswith("disk full")):
            raise
        raise error(reason) from exc


def write_failure(target: Path, exc: Exception) -> str:
    """The one-line reason ``exc`` stopped writing ``target``; a full disk is named as such.

    Not every writer reports ENOSPC with its errno (numpy's ``tofile`` says "N requested and
    M written", safetensors its own error), so a failure on a disk with no space left
    counts as a full disk too.
    """
    if getattr(exc, "errno", None) in _DISK_FULL or _no_space_left(target.parent):
        said = f" ({exc.strerror})" if getattr(exc, "strerror", None) else ""
        return f"disk full: cannot write {target}{said}: free space on that disk or write elsewhere"
    if isinstance(exc, OSError):
        return f"cannot write {target}: {exc.strerror or exc}"
    return str(exc) if isinstance(exc, PyactaddError) else f"cannot write {target}: {short_reason(exc)}"


def _no_space_left(directory: Path) -> bool:
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):  # no such folder; not POSIX
        return False
    blocks = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail  # root may use the reserved blocks
    return blocks * stat.f_frsize < _NEARLY_FULL_BYTES


def atomic_write_text(target: Path, text: str, *, error: type[PyactaddError] = SteeringFileError) -> None:
    """Write ``text`` (UTF-8) to ``target`` through :func:`atomic_write`."""
    atomic_write(Path(target), lambda temp: temp.write_text(text, encoding="utf-8"), error=error)


def short_reason(exc: BaseException, limit: int = 120) -> str:
    """``Type: message`` of an exception, first line only, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str) -> str:
    """``text`` with control characters escaped, safe to print inside a one-line error."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
