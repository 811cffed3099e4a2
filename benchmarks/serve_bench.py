"""Throughput and latency of `pyactadd serve`: steered vs unsteered short completions.

Starts a server on 127.0.0.1 (a port the OS picks) with one Love − Hate vector, then runs
a load generator on loopback: C concurrent clients (keep-alive HTTP connections) send
non-streaming /v1/completions requests. Three loads, interleaved over several rounds so
background noise hits them alike:

* unsteered: no ``steering`` field;
* steered: every request steers with the vector (front alignment, 2 positions, layer 6);
* mixed: requests alternate steered and unsteered, so the steering changes on every job.

Prints requests/s, completion tokens/s and p50/p95 latency per load, and the steered /
unsteered throughput ratio (target: at least 0.95).

With ``--parallel N`` it compares batching instead: one server at ``--parallel 1`` and one at
``--parallel N``, each under three loads from the same clients: every client on another of 8
vectors (four prompt pairs and their negations), all on one vector, and unsteered. Targets:
aggregate tokens/s of the 8-vector load at ``--parallel 8`` at least 1.3x ``--parallel 1`` on
the default model (2x on the 8B-shaped model of benchmarks/synthetic_gguf.py), and at least
0.95x the unsteered load at ``--parallel 8``; p95 latency below ``--parallel 1``'s.

    python benchmarks/serve_bench.py
    python benchmarks/serve_bench.py --concurrency 8 --requests 40 --rounds 3 --json serve.json
    python benchmarks/serve_bench.py --parallel 8 --concurrency 8 --max-tokens 64 --requests 16 --json serve_parallel.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

PROMPTS = ["I hate you because", "The weather today is", "My favourite food is", "Yesterday I went to"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


PAIRS = [("Love", "Hate"), ("Happy", "Sad"), ("Calm", "Angry"), ("Wedding", "Funeral")]
VECTORS = [f"{sign}{positive.lower()}" for positive, _ in PAIRS for sign in ("", "anti_")]


def request_body(kind: str, index: int, max_tokens: int, coeff: float) -> bytes:
    """Request ``index`` of one load: steered, unsteered, alternating ("mixed"), one of 8 vectors ("vectors8")."""
    request = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    if kind in ("steered", "one_vector") or (kind == "mixed" and index % 2 == 0):
        request["steering"] = [{"vector": "love", "coeff": coeff}]
    elif kind == "vectors8":
        request["steering"] = [{"vector": VECTORS[index % len(VECTORS)], "coeff": coeff}]
    return json.dumps(request).encode()


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes, float]:
    """POST one completion, backing off while the queue is full; (status, body, seconds of the answered try)."""
    while True:
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 503:
            return response.status, data, time.perf_counter() - started
        time.sleep(min(float(response.getheader("Retry-After") or 1), 2.0))  # queue full: back off as told


def load(url: str, kind: str, n_requests: int, concurrency: int, max_tokens: int, coeff: float) -> dict:
    """Send ``n_requests`` of one kind from ``concurrency`` clients; return timings."""
    parts = urlsplit(url)
    lock = threading.Lock()
    indices = iter(range(n_requests))
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        try:
            while (index := _next(indices, lock)) is not None:
                status, data, elapsed = post(connection, request_body(kind, index, max_tokens, coeff))
                with lock:
                    if status != 200:
                        errors.append(f"{status}: {data[:200]!r}")
                    else:
                        latencies.append(elapsed)
                        tokens[0] += json.loads(data)["usage"]["completion_tokens"]
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{kind}: {len(errors)} failed requests, e.g. {errors[0]}")
    return {"wall_s": wall, "latencies": latencies, "tokens": tokens[0], "requests": len(latencies)}


def _next(indices, lock: threading.Lock) -> int | None:
    with lock:
        return next(indices, None)


KINDS = ["unsteered", "steered", "mixed"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=24, help="requests per load per round")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coeff", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads in the server (default: its own)")
    parser.add_argument("--prompt-cache", action="store_true", help="run the server with --prompt-cache")
    parser.add_argument("--parallel", type=int, default=None, help="compare serve --parallel 1 with --parallel N (see above)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    return parser.parse_args(argv)


def write_vectors(folder: Path, model: str | None, all_pairs: bool) -> None:
    """love.gguf, and with ``all_pairs`` the 8 vectors of VECTORS (each pair and its negation)."""
    from pyactadd.extract.pipeline import extract

    for positive, negative in PAIRS if all_pairs else PAIRS[:1]:
        vector = extract(positive, negative, [6], model=model, backend="llama" if model else "torch")
        vector.save(folder / f"{positive.lower()}.gguf")
        if all_pairs:
            (vector * -1.0).save(folder / f"anti_{positive.lower()}.gguf")


def measure(args: argparse.Namespace, kinds: list[str] = KINDS, parallel: int = 1, folder: str | None = None) -> dict:
    """Run every load of ``kinds`` for every round against one server; the totals per load."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test helpers; pyactadd is the installed package
    from helpers.server_launcher import ServerProcess

    results = {kind: {"wall_s": 0.0, "latencies": [], "tokens": 0, "requests": 0, "rounds_rps": []} for kind in kinds}
    with tempfile.TemporaryDirectory() as own:
        if folder is None:
            folder = own
            write_vectors(Path(folder), args.model, all_pairs=False)
        server_args = ["--vectors", folder, "--queue-size", str(max(8, args.concurrency * 2)), "--parallel", str(parallel)]
        server_args += ["--model", args.model] if args.model else []
        server_args += ["--threads", str(args.threads)] if args.threads else []
        server_args += ["--prompt-cache"] if args.prompt_cache else []
        with ServerProcess(*server_args) as server:
            load(server.url, kinds[0], args.concurrency, args.concurrency, args.max_tokens, args.coeff)  # warm-up
            for round_index in range(args.rounds):
                shift = round_index % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    got = load(server.url, kind, args.requests, args.concurrency, args.max_tokens, args.coeff)
                    total = results[kind]
                    for key in ("wall_s", "latencies", "tokens", "requests"):
                        total[key] += got[key]
                    total["rounds_rps"].append(got["requests"] / got["wall_s"])
                    print(f"parallel {parallel} round {round_index + 1}/{args.rounds} {kind:>10}: "
                          f"{got['tokens'] / got['wall_s']:6.1f} tok/s", file=sys.stderr)
    return results


def summarize(results: dict) -> dict:
    """Requests/s, tokens/s and latency percentiles per load."""
    summary = {}
    for kind, total in results.items():
        summary[kind] = {
            "requests_per_s": total["requests"] / total["wall_s"],
            "tokens_per_s": total["tokens"] / total["wall_s"],
            "p50_ms": 1000 * statistics.median(total["latencies"]),
            "p95_ms": 1000 * percentile(total["latencies"], 95),
            "requests": total["requests"],
            "median_round_requests_per_s": statistics.median(total["rounds_rps"]),
        }
    return summary


BATCH_KINDS = ["vectors8", "one_vector", "unsteered"]


def compare_batching(args: argparse.Namespace) -> int:
    """--parallel 1 against --parallel N under the three BATCH_KINDS loads, side by side."""
    with tempfile.TemporaryDirectory() as folder:
        write_vectors(Path(folder), args.model, all_pairs=True)
        by_parallel = {n: summarize(measure(args, BATCH_KINDS, n, folder)) for n in (1, args.parallel)}
    one, many = by_parallel[1], by_parallel[args.parallel]
    print(f"\npyactadd serve: {args.concurrency} clients, {args.max_tokens} tokens each, temperature 0, {args.rounds} rounds x {args.requests} requests")
    print(f"{'load':<11} {'tok/s p1':>9} {'tok/s p' + str(args.parallel):>9} {'ratio':>6} {'p95 ms p1':>10} {'p95 ms p' + str(args.parallel):>10}")
    for kind in BATCH_KINDS:
        ratio = many[kind]["tokens_per_s"] / one[kind]["tokens_per_s"]
        print(f"{kind:<11} {one[kind]['tokens_per_s']:9.1f} {many[kind]['tokens_per_s']:9.1f} {ratio:6.2f} "
              f"{one[kind]['p95_ms']:10.0f} {many[kind]['p95_ms']:10.0f}")
    gain = many["vectors8"]["tokens_per_s"] / one["vectors8"]["tokens_per_s"]
    cost = many["vectors8"]["tokens_per_s"] / many["unsteered"]["tokens_per_s"]
    print(f"8 vectors, --parallel {args.parallel} / --parallel 1: {gain:.2f}x (target 1.3x on the default model, 2x at 8B)")
    print(f"8 vectors / unsteered at --parallel {args.parallel}: {cost:.3f} (target 0.95)")
    if args.json_out:
        settings = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "requests_per_round": args.requests,
                    "rounds": args.rounds, "coeff": args.coeff, "threads": args.threads, "parallel": args.parallel, "model": args.model}
        out = {"settings": settings, "parallel_1": one, f"parallel_{args.parallel}": many, "gain": gain, "steered_over_unsteered": cost}
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parallel is not None:
        return compare_batching(args)
    summary = summarize(measure(args))
    ratio = summary["steered"]["requests_per_s"] / summary["unsteered"]["requests_per_s"]
    settings = {
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "requests_per_round": args.requests,
        "rounds": args.rounds, "coeff": args.coeff, "threads": args.threads, "prompt_cache": args.prompt_cache,
    }
    print(f"\npyactadd serve on loopback: {args.concurrency} clients, max_tokens {args.max_tokens}, temperature 0, "
          f"{args.rounds} rounds x {args.requests} requests per load")
    print(f"{'load':<10} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for kind in KINDS:
        row = summary[kind]
        print(f"{kind:<10} {row['requests_per_s']:7.2f} {row['tokens_per_s']:7.1f} {row['p50_ms']:8.0f} {row['p95_ms']:8.0f}")
    verdict = "meets" if ratio >= 0.95 else "MISSES"
    print(f"steered / unsteered throughput: {ratio:.3f} ({verdict} the 0.95 target)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"settings": settings, "results": summary, "steered_over_unsteered": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
