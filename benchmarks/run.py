"""pyactadd against the alternatives a user would pick, on the default model, in one run.

    python benchmarks/run.py [--quick] [--json OUT] [--threads N] [--skip-extract]

Measures, with interleaved repeats and medians (a busy machine slows every variant alike):

* generation and prefill tokens/s of (a) llama.cpp unsteered, (b) llama.cpp's own control
  vector at every position, (c) pyactadd front-aligned per-position steering, (d) pyactadd
  'all' alignment (which pyactadd hands to llama.cpp's control vector) and, for reference,
  the same through the engine's callback, (e) transformers + a PyTorch forward pre-hook in
  float32 (the paper's method, what repeng and steering-vectors do);
* `pyactadd extract` wall time for one pair, cold (empty cache) and warm, the time per
  extra layer, and the peak memory;
* scaling: speed as the number of steered layers and steered positions grow, and prefill
  time as the prompt grows, steered vs unsteered.

Prints markdown tables; ``--json`` writes every number (keys include
``generation_ratio_vs_unsteered``, ``prefill_ratio_vs_unsteered``,
``generation_speedup_vs_torch_hooks``, ``extract_cold_s``, ``extract_warm_s``).
Targets: (c)/(a) >= 0.97 generation, >= 0.9 prefill; (c)/(e) >= 5 generation; warm
extraction <= 3 s, cold <= 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pyactadd.default_model import default_model_path
from pyactadd.runtime.generate import load_llama
from pyactadd.runtime.steering import Steering
from pyactadd.vector import ModelFingerprint, SteeringVector

TEXT = (
    "The harbour was quiet that morning. Fishing boats rocked against the pier while gulls argued over "
    "scraps, and the old lighthouse keeper walked the length of the breakwater as he had done for forty years. "
)


def median_rate(samples: list[float]) -> float:
    return statistics.median(samples)


# --- llama.cpp side ----------------------------------------------------------------------


def prefill_rate(llama, ids) -> float:
    llama.reset()
    start = time.perf_counter()
    llama.eval(ids)
    return len(ids) / (time.perf_counter() - start)


def generation_rate(llama, ids, n_gen: int) -> float:
    """Tokens/s of one-token decoding after the prompt (fixed tokens: sampling is not measured)."""
    llama.reset()
    llama.eval(ids)
    follow = ids[:n_gen]
    start = time.perf_counter()
    for token in follow:
        llama.eval([token])
    return len(follow) / (time.perf_counter() - start)


def reset_steering(llama) -> None:
    """No steering at all: pyactadd's cleared (where attached), llama.cpp's cvec off."""
    import llama_cpp

    if llama in ATTACHED:
        Steering.of(llama).clear()
    llama_cpp.llama_set_adapter_cvec(llama.ctx, None, 0, llama.n_embd(), -1, -1)


ATTACHED: list = []  # Llamas with pyactadd's engine; the others are llama-cpp-python untouched


def random_vector(fp, layers: list[int], n_rows: int, alignment: str, seed: int = 0) -> SteeringVector:
    rng = np.random.default_rng(seed)
    rows = {layer: rng.standard_normal((n_rows, fp.n_embd)).astype(np.float32) for layer in layers}
    return SteeringVector(layers=rows, fingerprint=fp, alignment=alignment)


def measure(configs: dict[str, tuple[object, Callable[[], None]]], ids, n_gen: int, repeats: int) -> dict[str, dict[str, float]]:
    """Prefill and generation tokens/s per configuration ``name -> (llama, apply)``, runs interleaved.

    Each round runs every configuration once; a configuration's ratio to the first one is
    the median of its per-round ratios, so a slow spell of a shared machine hits both
    sides of a ratio alike.
    """
    prefill: dict[str, list[float]] = {name: [] for name in configs}
    generation: dict[str, list[float]] = {name: [] for name in configs}
    for llama, apply in configs.values():  # warm-up: graph allocation, page cache
        reset_steering(llama)
        apply()
        prefill_rate(llama, ids[:32])
    for _ in range(repeats):
        for name, (llama, apply) in configs.items():
            reset_steering(llama)
            apply()
            prefill[name].append(prefill_rate(llama, ids))
            if n_gen:
                generation[name].append(generation_rate(llama, ids, n_gen))
    for llama, _ in configs.values():
        reset_steering(llama)
    base = next(iter(configs))
    out = {}
    for name in configs:
        r = {"prefill_tok_s": median_rate(prefill[name]), "prefill_ratio": median_rate([a / b for a, b in zip(prefill[name], prefill[base])])}
        if n_gen:
            r["generation_tok_s"] = median_rate(generation[name])
            r["generation_ratio"] = median_rate([a / b for a, b in zip(generation[name], generation[base])])
        out[name] = r
    return out


# --- PyTorch hooks (the paper's method) ----------------------------------------------------


def torch_hook_rates(rows: np.ndarray, layer: int, ids: list[int], n_gen: int, repeats: int, threads: int) -> dict[str, float]:
    """Prefill and generation tokens/s of transformers with a forward pre-hook adding ``rows`` at the front."""
    import torch
    from transformers import AutoModelForCausalLM

    from pyactadd.extract import torch_model

    torch.set_num_threads(threads)
    torch_model.load_torch_model(default_model_path(), progress=False)  # ensures the converted cache exists
    entry = next(p for p in (torch_model.cache_root() / "torch").iterdir() if json.loads((p / "config.json").read_text())["model_type"] == "llama")
    model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32).eval()
    add = torch.from_numpy(rows)

    def pre_hook(module, args, kwargs):
        # The prompt is prefilled from position 0 and is longer than the rows, so rows go
        # only into the prefill; generated tokens (past the rows) pass through unchanged,
        # but the hook still runs for each of them, as in hook-based steering libraries.
        hidden = args[0]
        if hidden.shape[1] == 1:
            return None
        hidden = hidden.clone()
        hidden[:, : add.shape[0]] += add
        return (hidden, *args[1:]), kwargs

    handle = model.model.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    prefill, generation = [], []
    input_ids = torch.tensor([ids])
    try:
        with torch.inference_mode():
            model(input_ids=input_ids[:, :16], use_cache=False)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                out = model(input_ids=input_ids, use_cache=True)
                prefill.append(len(ids) / (time.perf_counter() - start))
                past = out.past_key_values
                token = input_ids[:, -1:]
                start = time.perf_counter()
                for _ in range(n_gen):
                    out = model(input_ids=token, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    token = out.logits[:, -1:].argmax(-1)
                generation.append(n_gen / (time.perf_counter() - start))
    finally:
        handle.remove()
    return {"prefill_tok_s": median_rate(prefill), "generation_tok_s": median_rate(generation)}


# --- extraction ----------------------------------------------------------------------------


def time_extract(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `pyactadd extract` process."""
    with tempfile.TemporaryDirectory() as tmp:
        # The console script as users run it (start-up included), else the module.
        launcher = [shutil.which("pyactadd")] if shutil.which("pyactadd") else [sys.executable, "-m", "pyactadd"]
        cmd = [*launcher, "extract", *args, "-o", str(Path(tmp) / "v.gguf")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024


def extraction_numbers(n_layer: int, repeats: int) -> dict[str, float]:
    pair = ["-p", "Love", "-n", "Hate"]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYACTADD_CACHE_DIR": cache}
        cold, cold_peak = time_extract([*pair, "-l", "6"], env)
        warm = [time_extract([*pair, "-l", "6"], env) for _ in range(repeats)]
        many_layers = [f"-l{layer}" for layer in range(1, n_layer)]
        warm_all = [time_extract([*pair, *many_layers], env)[0] for _ in range(repeats)]
    warm_s = statistics.median(w for w, _ in warm)
    return {
        "extract_cold_s": cold,
        "extract_warm_s": warm_s,
        "extract_warm_all_layers_s": statistics.median(warm_all),
        # One forward pass records every block input, so an extra layer costs only its rows.
        "extract_per_extra_layer_s": (statistics.median(warm_all) - warm_s) / (n_layer - 2),
        "extract_peak_mib_cold": cold_peak,
        "extract_peak_mib_warm": max(p for _, p in warm),
    }


# --- report ----------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rate_rows(results: dict[str, dict[str, float]]) -> list[list[str]]:
    """One table row per configuration: prefill and generation tok/s and their ratios."""
    return [
        [name, f"{r['prefill_tok_s']:.0f}", f"{r['prefill_ratio']:.3f}", f"{r['generation_tok_s']:.1f}", f"{r['generation_ratio']:.3f}"]
        for name, r in results.items()
    ]


def nothing() -> None:
    """No steering to apply (the configuration runs as reset_steering left it)."""


@dataclass
class Bench:
    """What every section measures on: two Llamas of the default model, the prompt and the sizes."""

    plain: Any  # llama-cpp-python as users have it, without pyactadd's callback
    llama: Any  # a second Llama of the same model with the engine attached
    steering: Steering
    all_ids: list[int]
    n_prompt: int
    n_gen: int
    repeats: int
    quick: bool
    layer: int = 6
    n_rows: int = 8

    @property
    def fp(self) -> ModelFingerprint:
        return self.steering.fingerprint

    @property
    def ids(self) -> list[int]:
        return self.all_ids[: self.n_prompt]

    def front(self) -> SteeringVector:
        """The main steered configuration: ``n_rows`` front-aligned random rows at ``layer``."""
        return random_vector(self.fp, [self.layer], self.n_rows, "front")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (a smoke run)")
    parser.add_argument("--json", type=Path, help="write every number as JSON here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-extract", action="store_true", help="skip the extraction timings")
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    """Load the two Llamas and tokenize the prompt; sizes shrink with ``--quick``."""
    plain = load_llama(default_model_path(), n_ctx=4096, n_threads=args.threads)
    llama = load_llama(default_model_path(), n_ctx=4096, n_threads=args.threads)
    steering = Steering.of(llama)
    ATTACHED.append(llama)
    all_ids = llama.tokenize((TEXT * 120).encode(), add_bos=True, special=True)
    n_prompt, n_gen = (128, 32) if args.quick else (256, 64)
    return Bench(plain, llama, steering, all_ids, n_prompt, n_gen, 3 if args.quick else 7, args.quick)


def speed_section(bench: Bench, threads: int, report: dict[str, Any]) -> str:
    """Variants (a) to (e) against each other; the headline ratios go into ``report``."""
    fp, layer, steering = bench.fp, bench.layer, bench.steering
    front = bench.front()
    one_row = random_vector(fp, [layer], 1, "all")
    configs = {
        "(a) llama.cpp unsteered": (bench.plain, nothing),
        "(b) llama.cpp control vector, every position": (bench.plain, lambda: llama_cvec(bench.plain, fp, layer, one_row.layers[layer][0])),
        "(c) pyactadd front, P=8": (bench.llama, lambda: steering.set([(front, 1.0)])),
        "(d) pyactadd all (llama.cpp cvec)": (bench.llama, lambda: steering.set([(one_row, 1.0)])),
        "(d') pyactadd all through the engine": (bench.llama, lambda: steering.set([(one_row, 1.0)], use_llama_cvec=False)),
        "(a') pyactadd attached, nothing set": (bench.llama, steering.clear),
    }
    results = measure(configs, bench.ids, bench.n_gen, bench.repeats)
    torch_rates = torch_hook_rates(front.layers[layer], layer, bench.ids, bench.n_gen, max(2, bench.repeats // 2), threads)
    base = results["(a) llama.cpp unsteered"]
    torch_rates["prefill_ratio"] = torch_rates["prefill_tok_s"] / base["prefill_tok_s"]
    torch_rates["generation_ratio"] = torch_rates["generation_tok_s"] / base["generation_tok_s"]
    results["(e) transformers + PyTorch pre-hook (float32)"] = torch_rates
    c = results["(c) pyactadd front, P=8"]
    report["variants"] = results
    report["generation_ratio_vs_unsteered"] = c["generation_ratio"]
    report["prefill_ratio_vs_unsteered"] = c["prefill_ratio"]
    report["generation_speedup_vs_torch_hooks"] = c["generation_tok_s"] / torch_rates["generation_tok_s"]
    report["prefill_speedup_vs_torch_hooks"] = c["prefill_tok_s"] / torch_rates["prefill_tok_s"]
    return table(
        f"Speed (prompt {bench.n_prompt} tokens, {bench.n_gen} generated; tok/s: median of {bench.repeats}; vs (a): median of per-round ratios)",
        ["variant", "prefill tok/s", "vs (a)", "generation tok/s", "vs (a)"], rate_rows(results),
    )


def scaling_section(bench: Bench, report: dict[str, Any]) -> str:
    """Speed as the steered layers and positions grow (on the attached Llama, against plain llama.cpp)."""
    fp, steering, n_rows = bench.fp, bench.steering, bench.n_rows
    configs: dict[str, tuple[object, Callable[[], None]]] = {"unsteered (plain llama.cpp)": (bench.plain, nothing)}
    for n_layers in (1, 4, fp.n_layer - 1):
        v = random_vector(fp, list(range(1, 1 + n_layers)), n_rows, "front")
        configs[f"front P={n_rows}, {n_layers} layers"] = (bench.llama, lambda v=v: steering.set([(v, 1.0)]))
    for n_pos in (1, 64):
        v = random_vector(fp, [bench.layer], n_pos, "front")
        configs[f"front P={n_pos}, 1 layer"] = (bench.llama, lambda v=v: steering.set([(v, 1.0)]))
    scale = measure(configs, bench.ids, bench.n_gen, max(3, bench.repeats // 2))
    report["scaling_layers_positions"] = scale
    header = ["variant", "prefill tok/s", "vs unsteered", "generation tok/s", "vs unsteered"]
    return table("Scaling: steered layers and positions", header, rate_rows(scale))


def prefill_length_section(bench: Bench, report: dict[str, Any]) -> str:
    """Prefill time as the prompt grows, unsteered against front-aligned steering."""
    front = bench.front()
    configs = {"unsteered": (bench.plain, nothing), "front": (bench.llama, lambda: bench.steering.set([(front, 1.0)]))}
    lengths = (64, 256, 1024) if bench.quick else (64, 256, 1024, 2048)
    rows = []
    report["prefill_by_length"] = {}
    for length in lengths:
        r = measure(configs, bench.all_ids[:length], 0, max(3, bench.repeats // 2))
        u, s = length / r["unsteered"]["prefill_tok_s"], length / r["front"]["prefill_tok_s"]
        rows.append([str(length), f"{u * 1000:.0f}", f"{s * 1000:.0f}", f"{r['front']['prefill_ratio']:.3f}"])
        report["prefill_by_length"][length] = {"unsteered_s": u, "steered_s": s, "ratio": r["front"]["prefill_ratio"]}
    title = f"Prefill time by prompt length (front, P={bench.n_rows})"
    return table(title, ["prompt tokens", "unsteered ms", "steered ms", "speed ratio"], rows)


def extraction_section(bench: Bench, report: dict[str, Any]) -> str:
    """`pyactadd extract` as a whole process: cold, warm, all layers, peak memory."""
    n_layer = bench.fp.n_layer
    ext = extraction_numbers(n_layer, 3 if bench.quick else 5)
    report.update(ext)
    return table("pyactadd extract (one pair, whole process)", ["measure", "value"], [
        ["cold (empty cache: GGUF → PyTorch conversion)", f"{ext['extract_cold_s']:.1f} s"],
        ["warm (cached weights)", f"{ext['extract_warm_s']:.2f} s"],
        [f"warm, all {n_layer - 1} layers in one file", f"{ext['extract_warm_all_layers_s']:.2f} s"],
        ["per extra layer", f"{ext['extract_per_extra_layer_s'] * 1000:.0f} ms"],
        ["peak memory cold / warm", f"{ext['extract_peak_mib_cold']:.0f} / {ext['extract_peak_mib_warm']:.0f} MiB"],
    ])


def targets_line(report: dict[str, Any]) -> str:
    """The figures against their targets (the targets are in the module docstring)."""
    line = (
        f"Targets: generation (c)/(a) = {report['generation_ratio_vs_unsteered']:.3f} (>= 0.97), "
        f"prefill (c)/(a) = {report['prefill_ratio_vs_unsteered']:.3f} (>= 0.9), "
        f"(c)/(e) generation = {report['generation_speedup_vs_torch_hooks']:.1f}x (>= 5)"
    )
    if "extract_warm_s" in report:
        line += f", warm extract {report['extract_warm_s']:.2f} s (<= 3), cold {report['extract_cold_s']:.1f} s (<= 30)"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run every section, print the tables and the targets, and write ``--json``."""
    args = parse_args(argv)
    bench = make_bench(args)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, Python {platform.python_version()}"
    report: dict[str, Any] = {"machine": machine, "prompt_tokens": bench.n_prompt, "generated_tokens": bench.n_gen, "repeats": bench.repeats}
    out = [speed_section(bench, args.threads, report), scaling_section(bench, report), prefill_length_section(bench, report)]
    if not args.skip_extract:
        out.append(extraction_section(bench, report))
    print(f"Default model (SmolLM2-135M-Instruct Q4_1) on {machine}\n")
    print("\n".join(out))
    print(targets_line(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


def llama_cvec(llama, fp, layer: int, row: np.ndarray) -> None:
    """llama.cpp's own control vector (what `llama-cli --control-vector` does), bypassing pyactadd."""
    import ctypes

    import llama_cpp

    buf = np.zeros((fp.n_layer - 1, fp.n_embd), dtype=np.float32)
    buf[layer - 2] = row  # block input `layer` is l_out-(layer-1), slot (layer-1)-1 of the buffer
    data = buf.reshape(-1)
    llama_cpp.llama_set_adapter_cvec(llama.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size, fp.n_embd, 1, fp.n_layer - 1)
    llama.reset()


if __name__ == "__main__":
    sys.exit(main())
