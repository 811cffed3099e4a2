"""Writing files so that a reader never sees half of one, and error text on one line.

Every output pyactadd writes (steering files, tensor files, sweep results, model caches)
goes through :func:`atomic_write`: an interrupted or failed write leaves the old file, or
none, never a partial one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

from pyactadd.errors import PyactaddError, SteeringFileError


def temp_path(target: Path) -> Path:
    """A hidden, unique temporary name beside ``target`` (same directory, so rename is atomic)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")


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
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise error(f"cannot write {target}: {exc.strerror or exc}") from exc
        if isinstance(exc, PyactaddError) or not isinstance(exc, Exception):
            raise
        raise error(f"cannot write {target}: {short_reason(exc)}") from exc


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
