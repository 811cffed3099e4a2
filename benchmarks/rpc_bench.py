"""Steering over llama.cpp's RPC backend: two `pyactadd worker` processes on loopback.

Loads the default model with all its layers on two local workers (15 layers each) and,
for comparison, in this process. Measures prefill and generation tokens/s (median of
several interleaved rounds) unsteered and steered, and counts the device<->host copies
the engine made per micro-batch (ggml_backend_tensor_get/set on RPC buffers: one read of
the positions per graph, then one read and one write per steered layer that has rows in
the micro-batch).

    python benchmarks/rpc_bench.py
    python benchmarks/rpc_bench.py --rounds 5 --json benchmarks/results/rpc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# The launchers are test helpers (tests/helpers); pyactadd itself is the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np

from pyactadd.runtime import rpc
from pyactadd.default_model import default_model_path
from pyactadd.runtime.generate import load_llama
from helpers.rpc_launcher import LocalWorkers
from pyactadd.runtime.steering import Steering
from pyactadd.vector.value import SteeringVector

TEXT = "The history of the world is long, and it is told in many ways by many people. " * 20


def rates(llama, ids: list[int], n_gen: int) -> tuple[float, float, dict, dict]:
    """(prefill tok/s, generation tok/s, engine stats of the prefill, engine stats of the generation)."""
    steering = Steering.of(llama)
    llama.reset()
    steering.reset_stats()
    start = time.perf_counter()
    llama.eval(ids)
    prefill = len(ids) / (time.perf_counter() - start)
    prefill_stats = steering.stats()
    steering.reset_stats()
    start = time.perf_counter()
    for token in ids[:n_gen]:
        llama.eval([token])
    generation = n_gen / (time.perf_counter() - start)
    return prefill, generation, prefill_stats, steering.stats()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker and for the local model")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def sample(models: dict, variants: dict, ids: list[int], rounds: int, n_gen: int) -> dict:
    """``rates`` of every (where, variant), interleaved over the rounds; the warm-up round dropped."""
    samples = {(where, name): [] for where in models for name in variants}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for where, llama in models.items():
            for name, vectors in variants.items():
                steering = Steering.of(llama)
                steering.clear()
                if vectors:
                    steering.set(vectors, align="front")
                samples[(where, name)].append(rates(llama, ids, n_gen))
                steering.clear()
    return {key: runs[1:] for key, runs in samples.items()}


def summarize(samples: dict, n_gen: int) -> dict[str, dict]:
    """Median rates, device copies and the ratio to the unsteered run, per (where, variant)."""
    results: dict[str, dict] = {}
    for (where, name), runs in samples.items():
        prefill_stats, gen_stats = runs[-1][2], runs[-1][3]
        n_prefill_batches = 1  # the whole prompt is one micro-batch (n_batch = n_ubatch = 512)
        results[f"{where}: {name}"] = {
            "prefill_tok_s": statistics.median(r[0] for r in runs),
            "generation_tok_s": statistics.median(r[1] for r in runs),
            "copies_per_prefill_microbatch": prefill_stats["n_device_copies"] / n_prefill_batches,
            "copies_per_generated_token": gen_stats["n_device_copies"] / n_gen,
        }
    for (where, name) in samples:
        base, r = results[f"{where}: unsteered"], results[f"{where}: {name}"]
        r["prefill_ratio"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["generation_ratio"] = r["generation_tok_s"] / base["generation_tok_s"]
    return results


def main() -> int:
    args = parse_args()
    model = default_model_path()
    # Not stopped before exit: the model frees its RPC buffers as the process ends, and the
    # workers end with it (LocalWorkers ties them to this process).
    workers = LocalWorkers(2, threads=args.threads)
    placement = rpc.Placement(tuple(workers.endpoints))
    remote = load_llama(model, n_ctx=1024, n_threads=args.threads, placement=placement)
    local = load_llama(model, n_ctx=1024, n_threads=args.threads)
    fp = Steering.of(local).fingerprint
    ids = local.tokenize(TEXT.encode(), add_bos=True, special=True)[: args.prompt_tokens]
    rng = np.random.default_rng(0)

    def vector(layers: list[int]) -> SteeringVector:
        return SteeringVector({L: rng.standard_normal((8, fp.n_embd)).astype(np.float32) for L in layers}, fingerprint=fp, alignment="front")

    variants = {
        "unsteered": [],
        "front, 1 layer, P=8": [(vector([6]), 1.0)],
        "front, 4 layers, P=8": [(vector([4, 8, 12, 16]), 1.0)],
    }
    results = summarize(sample({"local": local, "rpc": remote}, variants, ids, args.rounds, args.generate), args.generate)
    print(f"\nDefault model, prompt {len(ids)} tokens, {args.generate} generated, {args.threads} thread(s) per process, "
          f"2 workers on loopback, median of {args.rounds} rounds\n")
    print("| where: steering | prefill tok/s | vs unsteered | generation tok/s | vs unsteered | copies / prefill micro-batch | copies / generated token |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_ratio']:.3f} | {r['generation_tok_s']:.1f} | {r['generation_ratio']:.3f} "
              f"| {r['copies_per_prefill_microbatch']:.0f} | {r['copies_per_generated_token']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"prompt_tokens": len(ids), "generated": args.generate, "threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
