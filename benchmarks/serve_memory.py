"""The server's peak memory for the worst request its limits allow (Linux: reads /proc).

Starts `pyactadd serve` on 127.0.0.1 with ``--max-vector-bytes`` set to 16 times one
vector's size, uploads that vector (every block input 1..n_layer-1, ``--rows`` rows each),
then sends the worst request the limits allow: the vector named 16 times (the most a
``steering`` list holds), each at its own offset, so nothing can be shared. It resets the
server's peak resident set (``/proc/PID/clear_refs``) just before the request and reads
it (``VmHWM``) after, and prints what the request cost against the sum of the vectors it
names; the request is within bounds when that ratio is at most 2.

    python benchmarks/serve_memory.py
    python benchmarks/serve_memory.py --rows 512 --json serve_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ITEMS = 16  # pyactadd.server.schemas.MAX_STEERING_ITEMS


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _vector_file(folder: Path, rows: int) -> tuple[Path, int]:
    import numpy as np

    from pyactadd.default_model import default_model_path
    from pyactadd.runtime.generate import load_llama
    from pyactadd.runtime.steering import model_fingerprint
    from pyactadd.vector.value import SteeringVector

    llama = load_llama(default_model_path(), n_ctx=64, n_threads=1)
    try:
        fingerprint = model_fingerprint(llama)
    finally:
        llama.close()
    rng = np.random.default_rng(0)
    layers = {
        layer: (rng.standard_normal((rows, fingerprint.n_embd)) * 1e-3).astype(np.float32)
        for layer in range(1, fingerprint.n_layer)
    }
    path = folder / "big.gguf"
    SteeringVector(layers=layers, fingerprint=fingerprint, alignment="front").save(path)
    return path, sum(rows.nbytes for rows in layers.values())


def measure(rows: int = 256, threads: int = 1) -> dict:
    """Run the worst allowed request once; return the sizes and the peak it cost (bytes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test helpers; pyactadd is the installed package
    from helpers.server_launcher import ServerProcess, request

    with tempfile.TemporaryDirectory() as temp:
        path, vector = _vector_file(Path(temp), rows)
        data = path.read_bytes()
        n_ctx = rows + ITEMS + 64
        args = ("--threads", str(threads), "--n-ctx", str(n_ctx), "--max-upload", str(len(data) + 1024),
                "--max-vector-bytes", str(ITEMS * vector))
        with ServerProcess(*args) as server:
            status, _, entry = request(server.url, "PUT", "/v1/steering/vectors/big", data)
            assert status == 201 and entry["bytes"] == vector, entry
            body = {
                "prompt": "Hello", "max_tokens": 4, "seed": 0,
                "steering": [{"vector": "big", "coeff": 1.0, "align": offset} for offset in range(ITEMS)],
            }
            before = _status_kib(server.pid, "VmRSS") * 1024
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            status, _, answer = request(server.url, "POST", "/v1/completions", body)
            assert status == 200, answer
            peak = _status_kib(server.pid, "VmHWM") * 1024
            after = _status_kib(server.pid, "VmRSS") * 1024
            one_more = dict(body, steering=body["steering"] + body["steering"][:1])
            refused = request(server.url, "POST", "/v1/completions", one_more)[0]
            alive = server.alive()
    named = ITEMS * vector
    return {
        "vector_bytes": vector,
        "items": ITEMS,
        "named_bytes": named,
        "rss_before": before,
        "peak_rss": peak,
        "rss_after": after,
        "request_peak_bytes": peak - before,
        "ratio_to_named": (peak - before) / named,
        "over_limit_status": refused,
        "alive": alive,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per layer of the vector (default 256)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = measure(args.rows, args.threads)
    mib = 1 << 20
    print(f"vector: {result['vector_bytes'] / mib:.1f} MiB, named {result['items']} times: {result['named_bytes'] / mib:.1f} MiB")
    print(f"server RSS before the request: {result['rss_before'] / mib:.1f} MiB, peak: {result['peak_rss'] / mib:.1f} MiB, "
          f"after: {result['rss_after'] / mib:.1f} MiB")
    print(f"the request's peak cost: {result['request_peak_bytes'] / mib:.1f} MiB = "
          f"{result['ratio_to_named']:.2f} x the vectors it names (bound: 2)")
    print(f"one item more than the limit allows: HTTP {result['over_limit_status']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ratio_to_named"] <= 2 and result["over_limit_status"] == 400 and result["alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
