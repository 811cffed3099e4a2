"""Reading the text files prompts come from: one item a line, UTF-8, errors on one line.

Every command that reads a prompt, sentence or pair file goes through
:func:`read_text_lines`, so a missing file, a directory, a file that is not UTF-8 or
one with nothing in it is reported the same way everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyactadd.errors import InputError


def read_text_lines(
    path: str | os.PathLike[str], *, what: str, expected: str, when_empty: str
) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, stripped, with their 1-based line numbers.

    A UTF-8 byte-order mark (some editors write one) is dropped.

    Args:
        path: the file.
        what: what the file is, for "no such ...", e.g. ``"pairs file"``.
        expected: what to pass instead of a directory, e.g. ``"a text file with one sentence a line"``.
        when_empty: the rest of the message for a file without a non-blank line, after its
            name, e.g. ``"is empty: put one sentence a line"``.

    Raises:
        InputError: the file is missing, a directory, unreadable, not UTF-8, or blank.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory: pass {expected}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} cannot be decoded; "
            "save the file as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise InputError(f"{path} {when_empty}")
    return lines


def read_sentences(path: str | os.PathLike[str], *, what: str = "text file") -> list[str]:
    """Read a text set: UTF-8, one sentence a line; blank lines are skipped.

    Raises:
        InputError: the file is missing, unreadable, not UTF-8, or holds no sentence.
    """
    lines = read_text_lines(
        path, what=what, expected="a text file with one sentence a line", when_empty="is empty: put one sentence a line"
    )
    return [line for _, line in lines]
