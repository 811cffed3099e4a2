"""Terminal layout: side-by-side completions that fit the terminal, aligned tables, reports."""

from __future__ import annotations

import contextlib
import shutil
import textwrap
from typing import Callable, Iterable, Iterator, Sequence


def side_by_side(left_title: str, left: str, right_title: str, right: str, *, width: int | None = None) -> str:
    """Two wrapped columns with titles, separated by a vertical bar."""
    total = width or shutil.get_terminal_size((100, 24)).columns
    col = max(20, (total - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.splitlines() or [""]:
            lines.extend(textwrap.wrap(paragraph, col) or [""])
        return lines

    a = [left_title, "-" * min(col, len(left_title))] + wrap(left)
    b = [right_title, "-" * min(col, len(right_title))] + wrap(right)
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b))


def table(rows: Sequence[Sequence[object]], right: Iterable[int] = ()) -> list[str]:
    """Lines of an aligned table: the first row is the header, underlined; columns in ``right`` are right-aligned."""
    right = set(right)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def render(blocks: Iterable[object]) -> str:
    """A report (``pyactadd.measure.report``'s blocks) as text: a ``str`` is a line, anything
    else a table with ``rows`` and ``right``; trailing blank lines are dropped."""
    lines: list[str] = []
    for block in blocks:
        lines += [block] if isinstance(block, str) else table(block.rows, block.right)
    return "\n".join(lines).rstrip()


@contextlib.contextmanager
def progress_bar(desc: str, unit: str = "completion") -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr (off when stderr is not a terminal), as a ``progress(done, total)`` callback."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=False, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()
