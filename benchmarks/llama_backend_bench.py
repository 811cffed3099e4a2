"""One ``extract --backend llama`` job in this process: wall time, with or without the early stop.

    python benchmarks/llama_backend_bench.py MODEL|default LAYER stop|full

Run it under ``/usr/bin/time`` for the whole process, or under a watchdog that samples
anonymous memory (resident minus file-backed pages); docs/performance.md has the figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    start = time.perf_counter()
    from pyactadd.extract.llama_backend import ExtractBackend
    from pyactadd.extract.pipeline import extract

    model, layer, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    backend = ExtractBackend("llama", early_stop=mode == "stop")
    vector = extract("Love", "Hate", layer, model=None if model == "default" else model, backend=backend)
    with tempfile.TemporaryDirectory() as directory:
        vector.save(Path(directory) / "vector.gguf")
    print(f"extract --backend llama, layer {layer}, early stop {mode}: {time.perf_counter() - start:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
