"""Wall time of a behavioural evaluation on the default model: 3 conditions x 200 completions x 32 tokens.

    python benchmarks/behaviour_bench.py [--threads N] [--parallel 16] [--json OUT]

Runs what ``pyactadd eval --steer love.gguf:5 --task sentiment --to positive`` runs on the
first 100 shipped negative openings x 2 completions (unsteered, prompted with "Love", steered
with Love - Hate at layer 6 x 5), through the installed package: batched generation
(:func:`pyactadd.runtime.batch.generate_batch`), VADER, and the disfluency of every
completion in llama.cpp. Prints the time of each phase, generated tokens per second and the
result table. Target (behaviour issue): at most 3 minutes on 2 cores.

Extraction (one PyTorch forward pass per prompt) is timed apart and not counted: a user
extracts once and evaluates many times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from pyactadd.cli.display import render
from pyactadd.default_model import default_model_path
from pyactadd.extract.pipeline import extract
from pyactadd.measure.behaviour import evaluate_behaviour
from pyactadd.measure.evaluation import shipped_text
from pyactadd.measure.perplexity import BatchScorer, scoring_model
from pyactadd.measure.report import behaviour_report
from pyactadd.measure.scoring import make_task
from pyactadd.prompts.files import read_sentences
from pyactadd.runtime.generate import Sampling, load_llama

TARGET_SECONDS = 180
OPENINGS, PER_OPENING, TOKENS = 100, 2, 32


def main() -> int:
    args = _arguments()
    model = default_model_path()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f}, parallel {args.parallel}",
        flush=True,
    )
    t0 = time.perf_counter()
    love = extract("Love", "Hate", layers=6)
    extracted = time.perf_counter()
    task = make_task("sentiment", direction="positive")
    openings = read_sentences(shipped_text(task.default_openings))[:OPENINGS]
    llama = load_llama(model, n_threads=args.threads)
    scorer = BatchScorer(scoring_model(model, "auto"), n_threads=args.threads)  # as `eval --task` scores
    loaded = time.perf_counter()
    result = evaluate_behaviour(
        llama, scorer, openings, [(love, 5.0)], task, n=PER_OPENING, parallel=args.parallel,
        sampling=Sampling(max_tokens=TOKENS, temperature=0.7, seed=0),
    )
    done = time.perf_counter()
    payload = {**result.as_dict(completions=False), "openings_file": task.default_openings, "steering": [{"file": "Love - Hate, layer 6", "coeff": 5.0}]}
    print(render(behaviour_report(payload)))
    numbers = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "parallel": args.parallel,
        "conditions": len(result.conditions),
        "completions_per_condition": OPENINGS * PER_OPENING,
        "max_tokens": TOKENS,
        "generated_tokens": result.n_tokens,
        "seconds_extract": extracted - t0,
        "seconds_load": loaded - extracted,
        "seconds_generate": result.seconds["generate"],
        "seconds_score": result.seconds["score"],
        "seconds_total": done - loaded,
        "generated_tokens_per_second": result.n_tokens / result.seconds["generate"],
        "conditions_summary": payload["conditions"],
        "date": time.strftime("%Y-%m-%d"),
    }
    total = numbers["seconds_total"]
    print(
        f"\n{result.n_tokens} tokens generated in {numbers['seconds_generate']:.1f} s "
        f"({numbers['generated_tokens_per_second']:.0f} tok/s), scored in {numbers['seconds_score']:.1f} s; "
        f"total {total:.1f} s (+{numbers['seconds_extract']:.1f} s extraction, {numbers['seconds_load']:.1f} s loading)"
    )
    print(f"{'meets' if total <= TARGET_SECONDS else 'misses'} the target of {TARGET_SECONDS} s")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--json", default=None, help="Write the numbers to this file (e.g. benchmarks/results/behaviour.json).")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
