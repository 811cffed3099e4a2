"""How much memory this process may still take: asked before a job that could exhaust it
(an extraction, a llama.cpp context), so it is refused in one line instead of being killed
by the kernel."""

from __future__ import annotations

from pathlib import Path


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def free_memory_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """MemAvailable, or the room left under the cgroup's memory limit when that is lower; None if unknown."""
    candidates = []
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    root = Path(cgroup)
    limit = _read_int(root / "memory.max")  # cgroup v2
    used = _read_int(root / "memory.current")
    if limit is None:  # cgroup v1; "no limit" is a huge number
        limit = _read_int(root / "memory" / "memory.limit_in_bytes")
        used = _read_int(root / "memory" / "memory.usage_in_bytes")
        limit = limit if limit is not None and limit < 1 << 60 else None
    if limit is not None:
        candidates.append(max(0, limit - (used or 0)))
    return min(candidates) if candidates else None
