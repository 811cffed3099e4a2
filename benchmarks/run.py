"""Steered vs unsteered llama.cpp speed on the default model, measured in one run.

    python benchmarks/run.py [--quick] [--json OUT] [--threads N]

Prints a markdown table of prefill and generation tokens/s for
(a) unsteered, (b) llama.cpp's own control vector at every position, (c) pyactadd
front-aligned per-position steering, with ratios against (a). Runs are interleaved and
the median is reported, so a busy machine slows all variants alike. Targets (pipeline
issue): (c)/(a) >= 0.97 for generation and >= 0.9 for prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyactadd.default_model import default_model_path  # noqa: E402
from pyactadd.generate import load_llama  # noqa: E402
from pyactadd.steering import Steering  # noqa: E402
from pyactadd.vector import SteeringVector  # noqa: E402

TEXT = (
    "The harbour was quiet that morning. Fishing boats rocked against the pier while gulls argued over "
    "scraps, and the old lighthouse keeper walked the length of the breakwater as he had done for forty years. "
)


def variants(steering: Steering, layer: int, n_rows: int) -> dict[str, object]:
    """The steering configurations to compare, as callables that put them in force."""
    fp = steering.fingerprint
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n_rows, fp.n_embd)).astype(np.float32)
    one_row = rows[:1].copy()
    front = SteeringVector(layers={layer: rows}, fingerprint=fp, alignment="front")
    everywhere = SteeringVector(layers={layer: one_row}, fingerprint=fp, alignment="all")
    return {
        "unsteered": lambda: steering.clear(),
        "llama.cpp cvec (all positions)": lambda: steering.set([(everywhere, 1.0)]),
        "pyactadd front": lambda: steering.set([(front, 1.0)]),
    }


def time_prefill(llama, ids) -> float:
    llama.reset()
    start = time.perf_counter()
    llama.eval(ids)
    return len(ids) / (time.perf_counter() - start)


def time_generation(llama, ids, n_gen: int) -> float:
    """Tokens/s of single-token decoding after the prompt (fixed tokens: sampling is not measured)."""
    llama.reset()
    llama.eval(ids)
    follow = ids[:n_gen]
    start = time.perf_counter()
    for token in follow:
        llama.eval([token])
    return len(follow) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--rows", type=int, default=8, help="steered positions P of the front vector")
    args = parser.parse_args()

    repeats = 3 if args.quick else 7
    n_prompt = 128 if args.quick else 256
    n_gen = 32 if args.quick else 64

    llama = load_llama(default_model_path(), n_ctx=1024, n_threads=args.threads)
    steering = Steering.of(llama)
    ids = llama.tokenize((TEXT * 20).encode(), add_bos=True, special=True)[:n_prompt]
    configs = variants(steering, args.layer, args.rows)

    prefill: dict[str, list[float]] = {name: [] for name in configs}
    generation: dict[str, list[float]] = {name: [] for name in configs}
    for name, apply in configs.items():  # warm-up
        apply()
        time_prefill(llama, ids)
    for _ in range(repeats):
        for name, apply in configs.items():
            apply()
            prefill[name].append(time_prefill(llama, ids))
            generation[name].append(time_generation(llama, ids, n_gen))
    steering.clear()

    base_p = statistics.median(prefill["unsteered"])
    base_g = statistics.median(generation["unsteered"])
    rows = []
    for name in configs:
        p, g = statistics.median(prefill[name]), statistics.median(generation[name])
        rows.append({"variant": name, "prefill_tok_s": p, "generation_tok_s": g, "prefill_ratio": p / base_p, "generation_ratio": g / base_g})

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, {platform.python_version()}"
    print(f"Default model, prompt {len(ids)} tokens, {n_gen} generated, median of {repeats} ({machine})\n")
    print("| variant | prefill tok/s | ratio | generation tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['prefill_tok_s']:.1f} | {r['prefill_ratio']:.3f} | {r['generation_tok_s']:.1f} | {r['generation_ratio']:.3f} |")
    front = rows[-1]
    print(
        f"\nfront vs unsteered: generation {front['generation_ratio']:.3f} (target >= 0.97), "
        f"prefill {front['prefill_ratio']:.3f} (target >= 0.9)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "prompt_tokens": len(ids),
                    "generated_tokens": n_gen,
                    "repeats": repeats,
                    "variants": rows,
                    "generation_ratio_vs_unsteered": front["generation_ratio"],
                    "prefill_ratio_vs_unsteered": front["prefill_ratio"],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
