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
from pyactadd.measure.evaluation import DEFAULT_OFF_SET, DEFAULT_ON_SET, shipped_text
from pyactadd.measure.perplexity import BatchScorer, scoring_model
from pyactadd.prompts.files import read_sentences
from pyactadd.measure.plots import plot_sweep
from pyactadd.measure.sweep import DEFAULT_COEFFS, PNG_NAME, parse_coeffs, parse_layers, run_sweep, sweep_vector
from pyactadd.prompts.tokens import fingerprint_of

TARGET_SECONDS = 300


def main() -> int:
    args = _arguments()
    model = default_model_path()
    layers = parse_layers(args.layers, fingerprint_of(model).n_layer)
    coeffs = parse_coeffs(args.coeffs)
    on = read_sentences(shipped_text(DEFAULT_ON_SET))[: args.sentences]
    off = read_sentences(shipped_text(DEFAULT_OFF_SET))[: args.sentences]
    load_start = os.getloadavg()[0]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"load average {load_start:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        flush=True,
    )
    print(f"grid: {len(layers)} layers x {len(coeffs)} coefficients, {len(on)} + {len(off)} sentences", flush=True)
    result, clock, scored_with = _timed_sweep(model, layers, coeffs, on, off, args)
    numbers = _numbers(result, clock, model=model, scored_with=scored_with, args=args, load_start=load_start)
    numbers.update({"layers": len(layers), "coeffs": coeffs, "sentences": [len(on), len(off)]})
    _print_table(numbers, result.timing)
    _print_recommendation(numbers)
    total = numbers["seconds_total"]
    verdict = "meets" if total < TARGET_SECONDS else "misses"
    print(f"\n{verdict} the target of {TARGET_SECONDS} s ({total:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=60, help="lines taken from each shipped set")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--coeffs", default=",".join(f"{c:g}" for c in DEFAULT_COEFFS))
    parser.add_argument("--no-prune", action="store_true", help="evaluate every cell")
    parser.add_argument("--compute", choices=["auto", "f32", "model"], default="auto")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    return parser.parse_args()


def _timed_sweep(model: Path, layers: list[int], coeffs: list[float], on: list[str], off: list[str], args):
    """Extract, load, sweep and plot, with a clock reading after each stage: (result, clock, scored_with)."""
    clock = {"start": time.perf_counter(), "cpu_start": time.process_time()}
    vector = sweep_vector(" weddings", " ", layers, model=model)
    clock["extracted"] = time.perf_counter()
    scored_with = scoring_model(model, args.compute)
    scorer = BatchScorer(scored_with, n_threads=args.threads)
    clock["loaded"] = time.perf_counter()
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
        clock["plot_start"] = time.perf_counter()
        plot_sweep(result.as_dict(), Path(out) / PNG_NAME)
        clock["plotted"] = time.perf_counter()
    clock["cpu_seconds"] = time.process_time() - clock["cpu_start"]
    return result, clock, scored_with


def _numbers(result, clock: dict, *, model: Path, scored_with: Path, args, load_start: float) -> dict:
    """What the benchmark measured, as the JSON it writes."""
    timing = result.timing
    per_cell, decode = timing["seconds_per_cell"], timing["decode_seconds_per_cell"]
    return {
        "model": model.name,
        "scored_with": Path(scored_with).name,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cells": len(result.cells),
        "cells_evaluated": timing["cells_evaluated"],
        "cells_skipped": timing["cells_skipped"],
        "seconds_total": clock["plotted"] - clock["start"],
        "cpu_seconds_total": clock["cpu_seconds"],
        "seconds_extract": clock["extracted"] - clock["start"],
        "seconds_load_scorer": clock["loaded"] - clock["extracted"],
        "seconds_baseline": timing["baseline_seconds"],
        "seconds_grid": sum(c.seconds for c in result.cells if c.status == "ok"),
        "seconds_per_cell": per_cell,
        "llama_decode_seconds_per_cell": decode,
        "llama_decode_share": decode / per_cell if per_cell else None,
        "seconds_plot": clock["plotted"] - clock["plot_start"],
        "recommended": result.as_dict()["recommended"],
        "control": result.control_summary(),
        "target_seconds": TARGET_SECONDS,
    }


def _print_table(numbers: dict, timing: dict) -> None:
    per_cell, decode = numbers["seconds_per_cell"], numbers["llama_decode_seconds_per_cell"]
    checks = timing["seconds"] - timing["baseline_seconds"] - numbers["seconds_grid"]
    rows = [
        ("total wall time", f"{numbers['seconds_total']:.1f} s"),
        (f"  extraction ({numbers['layers']} layers, one pass per prompt)", f"{numbers['seconds_extract']:.1f} s"),
        ("  loading llama.cpp (+ float32 copy)", f"{numbers['seconds_load_scorer']:.1f} s"),
        ("  baseline (tokenize, continuations, unsteered)", f"{numbers['seconds_baseline']:.1f} s"),
        ("  grid", f"{numbers['seconds_grid']:.1f} s"),
        ("  held-out check + random controls", f"{checks:.1f} s"),
        ("  figure", f"{numbers['seconds_plot']:.1f} s"),
        ("cells evaluated / skipped (pruned)", f"{numbers['cells_evaluated']} / {numbers['cells_skipped']}"),
        ("time per evaluated cell", f"{per_cell:.2f} s"),
        ("  of which llama.cpp (llama_decode)", f"{decode:.2f} s ({100 * decode / per_cell:.0f} %)"),
        ("CPU time (all threads)", f"{numbers['cpu_seconds_total']:.1f} s"),
        ("load average start / end", f"{numbers['load_average_start']:.2f} / {numbers['load_average_end']:.2f}"),
    ]
    print()
    print(f"| {'measure':<44} | {'value':>14} |")
    print(f"|{'-' * 46}|{'-' * 16}|")
    for name, value in rows:
        print(f"| {name:<44} | {value:>14} |")


def _print_recommendation(numbers: dict) -> None:
    rec = numbers["recommended"]
    if not rec:
        return
    held = rec.get("holdout") or {}
    print(
        f"\nrecommended: L={rec['layer']} c={rec['coeff']:g}: tuning on {rec['tune']['on_ratio']:.3f} off "
        f"{rec['tune']['off_ratio']:.3f}; held-out on {held.get('on_ratio', float('nan')):.3f} off "
        f"{held.get('off_ratio', float('nan')):.3f}"
    )
    if numbers["control"]:
        c = numbers["control"]
        print(f"random control (mean of {c['n']}): on {c['mean_on_ratio']:.3f} off {c['mean_off_ratio']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
