"""Terminal output for completions: side-by-side columns that fit the terminal."""

from __future__ import annotations

import shutil
import textwrap


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
