"""Wall time of a full layer x coefficient sweep on the default model.

    python benchmarks/sweep_bench.py [--threads N] [--no-prune] [--sentences 60] [--json OUT]

Runs what ``pyactadd sweep -p " weddings" -n " "`` runs, on every valid layer (29 on
SmolLM2-135M) x the 6 default coefficients, over the first 60 lines of each shipped text
set (2 x 60 sentences: the grid is scored on the 30 + 30 even lines, the recommendation
checked on the 30 + 30 odd lines), and prints the total time, the time per cell and how
much of it is llama.cpp evaluation (inside ``llama_decode``; the rest is log-softmax over
the vocabulary in numpy and Python). Target (sweep issue): under 5 minutes on 2 cores.

The machine's load average is printed at the start and the end: on a shared machine
llama.cpp's OpenMP threads spin-wait for descheduled peers, which can multiply wall time;
``OMP_WAIT_POLICY=PASSIVE`` (set before the run) avoids that there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from pyactadd.default_model import default_model_path
from pyactadd.measure.evaluation import shipped_text
from pyactadd.measure.perplexity import BatchScorer, read_sentences, scoring_model
from pyactadd.measure.sweep import DEFAULT_COEFFS, parse_coeffs, parse_layers, run_sweep, sweep_vector
from pyactadd.prompts.tokens import fingerprint_of

TARGET_SECONDS = 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=60, help="lines taken from each shipped set")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--coeffs", default=",".join(f"{c:g}" for c in DEFAULT_COEFFS))
    parser.add_argument("--no-prune", action="store_true", help="evaluate every cell")
    parser.add_argument("--compute", choices=["auto", "f32", "model"], default="auto")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()

    model = default_model_path()
    fingerprint = fingerprint_of(model)
    layers = parse_layers(args.layers, fingerprint.n_layer)
    coeffs = parse_coeffs(args.coeffs)
    on = read_sentences(shipped_text("weddings.txt"))[: args.sentences]
    off = read_sentences(shipped_text("shipping.txt"))[: args.sentences]
    load_start = os.getloadavg()[0]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"load average {load_start:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        flush=True,
    )
    print(f"grid: {len(layers)} layers x {len(coeffs)} coefficients, {len(on)} + {len(off)} sentences", flush=True)

    started = time.perf_counter()
    cpu_started = time.process_time()
    vector = sweep_vector(" weddings", " ", layers, model=model)
    extracted = time.perf_counter()
    scored_with = scoring_model(model, args.compute)
    scorer = BatchScorer(scored_with, n_threads=args.threads)
    loaded = time.perf_counter()
    done = {"n": 0}

    def on_cell(cell, result) -> None:
        done["n"] += 1
        if cell.status == "ok":
            print(
                f"  [{done['n']:3d}/{len(result.cells)}] L={cell.layer:2d} c={cell.coeff:<6g} on {cell.on_ratio:.3f} "
                f"off {cell.off_ratio:.3f} score {cell.score:+.3f}  {cell.seconds:.1f} s",
                flush=True,
            )

    with tempfile.TemporaryDirectory() as out:
        result = run_sweep(
            vector, on, off, scorer=scorer, layers=layers, coeffs=coeffs, prune=not args.no_prune, out_dir=out,
            on_cell=on_cell,
        )
        plot_start = time.perf_counter()
        from pyactadd.measure.plots import plot_sweep

        plot_sweep(result.as_dict(), Path(out) / "sweep.png")
        plotted = time.perf_counter()
    total = plotted - started
    timing = result.timing
    evaluated = timing["cells_evaluated"]
    per_cell, decode = timing["seconds_per_cell"], timing["decode_seconds_per_cell"]
    numbers = {
        "model": model.name,
        "scored_with": Path(scored_with).name,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "layers": len(layers),
        "coeffs": coeffs,
        "cells": len(result.cells),
        "cells_evaluated": evaluated,
        "cells_skipped": timing["cells_skipped"],
        "sentences": [len(on), len(off)],
        "seconds_total": total,
        "cpu_seconds_total": time.process_time() - cpu_started,
        "seconds_extract": extracted - started,
        "seconds_load_scorer": loaded - extracted,
        "seconds_baseline": timing["baseline_seconds"],
        "seconds_grid": sum(c.seconds for c in result.cells if c.status == "ok"),
        "seconds_per_cell": per_cell,
        "llama_decode_seconds_per_cell": decode,
        "llama_decode_share": decode / per_cell if per_cell else None,
        "seconds_plot": plotted - plot_start,
        "recommended": result.as_dict()["recommended"],
        "control": result.control_summary(),
        "target_seconds": TARGET_SECONDS,
    }
    print()
    print(f"| {'measure':<44} | {'value':>14} |")
    print(f"|{'-' * 46}|{'-' * 16}|")
    rows = [
        ("total wall time", f"{total:.1f} s"),
        ("  extraction (29 layers, one pass per prompt)", f"{numbers['seconds_extract']:.1f} s"),
        ("  loading llama.cpp (+ float32 copy)", f"{numbers['seconds_load_scorer']:.1f} s"),
        ("  baseline (tokenize, continuations, unsteered)", f"{numbers['seconds_baseline']:.1f} s"),
        ("  grid", f"{numbers['seconds_grid']:.1f} s"),
        ("  held-out check + random controls", f"{timing['seconds'] - timing['baseline_seconds'] - numbers['seconds_grid']:.1f} s"),
        ("  figure", f"{numbers['seconds_plot']:.1f} s"),
        ("cells evaluated / skipped (pruned)", f"{evaluated} / {timing['cells_skipped']}"),
        ("time per evaluated cell", f"{per_cell:.2f} s"),
        ("  of which llama.cpp (llama_decode)", f"{decode:.2f} s ({100 * decode / per_cell:.0f} %)"),
        ("CPU time (all threads)", f"{numbers['cpu_seconds_total']:.1f} s"),
        ("load average start / end", f"{load_start:.2f} / {numbers['load_average_end']:.2f}"),
    ]
    for name, value in rows:
        print(f"| {name:<44} | {value:>14} |")
    rec = numbers["recommended"]
    if rec:
        held = rec.get("holdout") or {}
        print(
            f"\nrecommended: L={rec['layer']} c={rec['coeff']:g}: tuning on {rec['tune']['on_ratio']:.3f} off "
            f"{rec['tune']['off_ratio']:.3f}; held-out on {held.get('on_ratio', float('nan')):.3f} off "
            f"{held.get('off_ratio', float('nan')):.3f}"
        )
        if numbers["control"]:
            c = numbers["control"]
            print(f"random control (mean of {c['n']}): on {c['mean_on_ratio']:.3f} off {c['mean_off_ratio']:.3f}")
    verdict = "meets" if total < TARGET_SECONDS else "misses"
    print(f"\n{verdict} the target of {TARGET_SECONDS} s ({total:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
