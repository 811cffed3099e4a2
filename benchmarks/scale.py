"""pyactadd on a Llama-3-8B-shaped Q8_0 GGUF (random weights, SmolLM2's tokenizer), in one run.

    python benchmarks/scale.py [--model-file F] [--json OUT] [--threads N] [--max-anon-gib G]
                               [--max-seconds S] [--repeats N] [--measure-old] [--skip-speed] [--skip-extract]

Writes the synthetic model once (``benchmarks/synthetic_gguf.py``; cached under pyactadd's
cache directory, or reuse a file with ``--model-file``), reads it once so it sits in the
page cache, then measures:

* ``pyactadd extract`` as users run it (a fresh process each time, driven as a subprocess)
  on the PyTorch path (the default backend) and with ``--backend llama``: one pair at
  layers 8, 16 and 31, and ``--pairs`` with 32 pairs at layer 16. Wall time and peak
  *anonymous* memory of the process tree (resident minus file-backed pages, sampled every
  50 ms from a watcher thread: the model's mmap'd pages are page cache, not a cost), and
  what the command left in the cache directory. A command that passes ``--max-anon-gib``
  or ``--max-seconds`` is killed and reported so; one that fails is reported with its last
  line of output; neither stops the run.
* steered vs unsteered prefill and generation speed in llama.cpp with the engine, with the
  layer-16 vector extracted above (a random one, labelled so, when no extraction worked),
  interleaved repeats as in ``benchmarks/run.py``.
* the old whole-model path's memory: computed from the parameter count (float32 bytes of
  every tensor) and, with ``--measure-old``, measured up to the cap.

Prints markdown tables and writes ``--json`` (default ``benchmarks/results/scale.json``).
Targets (layer 16): PyTorch path peak anonymous memory <= 1.5 GiB and wall <= 45 s; llama
backend wall <= 15 s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from run import TEXT, measure, random_vector, table
from synthetic_gguf import stamp_path, write_synthetic

from pyactadd.extract.torch_model import cache_root
from pyactadd.gguf_header import read_header

GiB = 1 << 30
LAYERS = (8, 16, 31)
TARGET_LAYER = 16
N_PAIRS = 32
SAMPLE_S = 0.05
TARGETS = {"torch": {"wall_s": 45.0, "peak_anon_gib": 1.5}, "llama": {"wall_s": 15.0}}
BACKENDS = {"torch": ["--backend", "torch"], "llama": ["--backend", "llama"]}
WORDS = (
    "cats dogs rain music winter summer coffee books cities forests rivers mountains trains "
    "storms gardens parties mornings letters songs films oceans bridges markets kitchens "
    "islands deserts meadows festivals castles harbours libraries sunsets"
).split()


def default_model_file() -> Path:
    """Where the synthetic model is cached when ``--model-file`` is not given."""
    return cache_root() / "benchmarks" / "llama3-8b-q8_0.gguf"


# --- a command under a memory watcher ----------------------------------------------------


@dataclass
class Measured:
    """One command's wall time, peak anonymous memory and how it ended."""

    cmd: list[str]
    wall_s: float = 0.0
    peak_anon_gib: float = 0.0
    rc: int | None = None
    status: str = "ok"  # "ok", "killed at X GiB", "timed out at S s", "failed: <last line>", "not run: ..."
    cache_gib: float = 0.0
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def tree_anon_bytes(top: psutil.Process) -> int:
    """Resident minus file-backed/shared pages, summed over ``top`` and its descendants."""
    total = 0
    try:
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            info = proc.memory_info()
        except psutil.Error:
            continue
        total += info.rss - info.shared
    return total


class Watcher(threading.Thread):
    """Samples a process tree's anonymous memory; kills its process group past a cap or a deadline."""

    def __init__(self, proc: subprocess.Popen, max_anon: float, max_seconds: float, disk: Path, min_free: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.top = proc, psutil.Process(proc.pid)
        self.max_anon, self.max_seconds, self.disk, self.min_free = max_anon, max_seconds, disk, min_free
        self.peak = 0
        self.reason: str | None = None
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while self.proc.poll() is None:
            anon = tree_anon_bytes(self.top)
            self.peak = max(self.peak, anon)
            elapsed = time.perf_counter() - self.start_time
            if anon > self.max_anon:
                self.reason = f"killed at {anon / GiB:.1f} GiB (cap {self.max_anon / GiB:.0f}) after {elapsed:.0f} s"
            elif elapsed > self.max_seconds:
                self.reason = f"timed out at {self.max_seconds:.0f} s"
            elif shutil.disk_usage(self.disk).free < self.min_free:
                self.reason = f"killed: disk free fell below {self.min_free / GiB:.0f} GiB after {elapsed:.0f} s"
            if self.reason:
                self.kill()
                return
            time.sleep(SAMPLE_S)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def last_line(path: Path) -> str:
    """The last non-empty line a command printed (its error, when it failed)."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def dir_gib(path: Path) -> float:
    """Bytes under ``path`` in GiB (what a command left in the cache)."""
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
    return total / GiB


def run_capped(cmd: list[str], limits: argparse.Namespace, env: dict[str, str], log: Path) -> Measured:
    """Run ``cmd`` in its own process group under a :class:`Watcher`; never raises for the command's failure."""
    result = Measured(cmd)
    cache = Path(env["PYACTADD_CACHE_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            result.status = f"failed: {exc}"
            return result
        watcher = Watcher(proc, limits.max_anon_gib * GiB, limits.max_seconds, cache, limits.min_free_gib * GiB)
        watcher.start()
        result.rc = proc.wait()
        watcher.join()
        result.wall_s = time.perf_counter() - start
    result.peak_anon_gib = watcher.peak / GiB
    result.cache_gib = dir_gib(cache)
    result.output_tail = last_line(log)
    if watcher.reason:
        result.status = watcher.reason
    elif result.rc != 0:
        result.status = f"failed (exit {result.rc}): {result.output_tail}"
    return result


# --- the extraction jobs -------------------------------------------------------------------


def pyactadd_command() -> list[str]:
    """The console script as users run it (start-up included), else the module."""
    script = shutil.which("pyactadd")
    return [script] if script else [sys.executable, "-m", "pyactadd"]


def write_pairs(path: Path) -> Path:
    """A pairs file of ``N_PAIRS`` simple pairs in the --pairs format (JSONL, positive/negative)."""
    lines = [json.dumps({"positive": f"I love {word}", "negative": f"I hate {word}"}) for word in WORDS[:N_PAIRS]]
    path.write_text("\n".join(lines) + "\n")
    return path


def extract_jobs(pairs: Path) -> dict[str, list[str]]:
    """Job name -> the ``extract`` arguments (without model, output and backend)."""
    jobs = {f"layer {layer}": ["-p", "Love", "-n", "Hate", "-l", str(layer)] for layer in LAYERS}
    jobs[f"--pairs ({N_PAIRS} pairs), layer {TARGET_LAYER}"] = ["--pairs", str(pairs), "-l", str(TARGET_LAYER)]
    return jobs


def has_backend_option() -> bool:
    """Whether this pyactadd's ``extract`` takes ``--backend`` (the llama backend is built)."""
    done = subprocess.run([*pyactadd_command(), "extract", "--help"], capture_output=True, text=True)
    return "--backend" in done.stdout


def job_command(backend: str, args: list[str], model: Path, out: Path, backend_there: bool) -> list[str] | None:
    """One job's ``extract`` command line, or None where this pyactadd has no such backend."""
    if not backend_there and backend != "torch":
        return None
    flags = BACKENDS[backend] if backend_there else []  # before --backend existed, torch was the only path
    return [*pyactadd_command(), "extract", *args, *flags, "--model", str(model), "-o", str(out)]


def extract_section(model: Path, work: Path, limits: argparse.Namespace, env: dict[str, str]) -> dict[str, dict[str, Measured]]:
    """Every job on every backend; backend -> job -> :class:`Measured`. Vector files stay in ``work``."""
    jobs = extract_jobs(write_pairs(work / "pairs.jsonl"))
    backend_there = has_backend_option()
    results: dict[str, dict[str, Measured]] = {backend: {} for backend in BACKENDS}
    for backend in BACKENDS:
        for index, (job, args) in enumerate(jobs.items()):
            out = work / f"{backend}-{index}.gguf"
            cmd = job_command(backend, args, model, out, backend_there)
            if cmd is None:
                results[backend][job] = Measured([], status="not run: this pyactadd's extract has no --backend option")
                continue
            print(f"[scale] {backend}: {job} ...", file=sys.stderr, flush=True)
            measured = run_capped(cmd, limits, env, work / f"{backend}-{index}.log")
            if measured.ok and not out.is_file():
                measured.status = "failed: exit 0 but no output file"
            results[backend][job] = measured
            print(f"[scale]   {measured.wall_s:.1f} s, {measured.peak_anon_gib:.2f} GiB: {measured.status}", file=sys.stderr, flush=True)
    return results


def old_path_measured(model: Path, work: Path, limits: argparse.Namespace, env: dict[str, str]) -> Measured:
    """The whole-model float32 load (``load_torch_model``) in a fresh process, up to the caps."""
    code = "import sys; from pyactadd.extract.torch_model import load_torch_model; load_torch_model(sys.argv[1])"
    old_env = {**env, "PYACTADD_CACHE_DIR": str(work / "old-cache")}
    print("[scale] old whole-model path ...", file=sys.stderr, flush=True)
    measured = run_capped([sys.executable, "-c", code, str(model)], limits, old_env, work / "old.log")
    shutil.rmtree(work / "old-cache", ignore_errors=True)
    return measured


# --- steered vs unsteered speed ---------------------------------------------------------------


def load_output(measured: Measured | None):
    """The steering file a successful extract wrote, or None (with the reason on stderr)."""
    from pyactadd.vector import SteeringVector

    if measured is None or not measured.ok:
        return None
    path = measured.cmd[measured.cmd.index("-o") + 1]
    try:
        return SteeringVector.load(path)
    except Exception as exc:  # a file the loader refuses is a finding, not a reason to stop
        print(f"[scale] {path} does not load: {exc}", file=sys.stderr)
        return None


def layer_vector(extracted: dict[str, dict[str, Measured]]):
    """(vector, where it came from) of the first layer-16 extraction that worked, else (None, why not)."""
    for backend in ("llama", "torch"):
        vector = load_output(extracted.get(backend, {}).get(f"layer {TARGET_LAYER}"))
        if vector is not None:
            return vector, f"extracted ({backend} backend)"
    return None, "random rows (no layer-16 extraction worked)"


def backend_agreement(extracted: dict[str, dict[str, Measured]]) -> dict[str, dict[str, Any]]:
    """Job -> min and mean row cosine between the PyTorch and the llama backend's files (where both worked)."""
    from pyactadd.vector.compare import compare_vectors

    agreement = {}
    for job in extracted.get("torch", {}):
        first, second = (load_output(extracted.get(backend, {}).get(job)) for backend in ("torch", "llama"))
        if first is not None and second is not None:
            found = compare_vectors(first, second)
            agreement[job] = {"min_cosine": found["min_cosine"], "mean_cosine": found["mean_cosine"], "notes": found["notes"]}
    return agreement


def nothing() -> None:
    """The unsteered configuration applies nothing."""


def speed_section(model: Path, extracted: dict[str, dict[str, Measured]], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and generation tok/s, unsteered llama.cpp vs the engine steering at layer 16."""
    from pyactadd.runtime.generate import load_llama
    from pyactadd.runtime.steering import Steering

    print("[scale] steered vs unsteered speed ...", file=sys.stderr, flush=True)
    plain = load_llama(model, n_ctx=256, n_threads=args.threads)
    llama = load_llama(model, n_ctx=256, n_threads=args.threads)
    steering = Steering.of(llama)
    vector, source = layer_vector(extracted)
    if vector is None:
        vector = random_vector(steering.fingerprint, [TARGET_LAYER], 4, "front")
    rows = vector.layers[TARGET_LAYER].shape[0]
    ids = llama.tokenize((TEXT * 8).encode(), add_bos=True, special=True)[: args.n_prompt]
    configs = {
        "unsteered (llama.cpp, no engine)": (plain, nothing),
        f"steered: layer {TARGET_LAYER}, {rows} rows, front": (llama, lambda: steering.set([(vector, 1.0)])),
    }
    results = measure(configs, ids, args.n_gen, args.repeats)
    return {"vector": source, "prompt_tokens": len(ids), "generated_tokens": args.n_gen, "repeats": args.repeats, "variants": results}


# --- report ----------------------------------------------------------------------------------


def target_text(backend: str, job: str) -> str:
    """The target a row is held to ('' for rows without one)."""
    if job != f"layer {TARGET_LAYER}" or backend not in TARGETS:
        return ""
    target = TARGETS[backend]
    parts = [f"<= {target['wall_s']:.0f} s"]
    if "peak_anon_gib" in target:
        parts.append(f"<= {target['peak_anon_gib']} GiB")
    return ", ".join(parts)


def extract_table(extracted: dict[str, dict[str, Measured]]) -> str:
    """One row per backend and job."""
    names = {"torch": "PyTorch (--backend torch, the default)", "llama": "--backend llama"}
    rows = []
    for backend, jobs in extracted.items():
        for job, m in jobs.items():
            ran = not m.status.startswith("not run")
            wall, peak = (f"{m.wall_s:.1f}", f"{m.peak_anon_gib:.2f}") if ran else ("-", "-")
            rows.append([names[backend], job, wall, peak, f"{m.cache_gib:.2f}" if ran else "-", target_text(backend, job), m.status])
    header = ["path", "job", "wall s", "peak anon GiB", "cache left GiB", "target", "status"]
    return table("pyactadd extract (a fresh process each; the model in the page cache)", header, rows)


def old_table(old: dict[str, Any]) -> str:
    """The whole-model path: computed, and measured where asked."""
    rows = [[f"computed: float32 copy of all {old['n_params'] / 1e9:.2f} B parameters", f"{old['computed_gib']:.1f}", "computed"]]
    measured = old.get("measured")
    if measured:
        rows.append(["measured: load_torch_model in a fresh process", f"{measured['peak_anon_gib']:.2f}", measured["status"]])
    return table("The old whole-model path (for comparison)", ["what", "anon GiB", "status"], rows)


def agreement_table(agreement: dict[str, dict[str, Any]]) -> str:
    """Row cosines between the two backends' files for the same job (what `pyactadd compare` reports)."""
    def text(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [[job, text(a["min_cosine"]), text(a["mean_cosine"])] for job, a in agreement.items()]
    rows = rows or [["(no job worked on both backends)", "-", "-"]]
    return table("PyTorch vs llama backend: row cosine of the same job's files", ["job", "min", "mean"], rows)


def speed_table(speed: dict[str, Any]) -> str:
    """Prefill and generation rates and their ratios to the unsteered baseline."""
    rows = [
        [name, f"{r['prefill_tok_s']:.2f}", f"{r['prefill_ratio']:.3f}", f"{r['generation_tok_s']:.2f}", f"{r['generation_ratio']:.3f}"]
        for name, r in speed["variants"].items()
    ]
    title = (
        f"Steered vs unsteered (prompt {speed['prompt_tokens']} tokens, {speed['generated_tokens']} generated, "
        f"median of {speed['repeats']} interleaved rounds; vector: {speed['vector']})"
    )
    return table(title, ["variant", "prefill tok/s", "vs unsteered", "generation tok/s", "vs unsteered"], rows)


def targets_line(extracted: dict[str, dict[str, Measured]]) -> str:
    """Each layer-16 figure against its target, or why there is none."""
    parts = []
    for backend, target in TARGETS.items():
        m = extracted.get(backend, {}).get(f"layer {TARGET_LAYER}")
        if m is None:
            parts.append(f"{backend} layer {TARGET_LAYER}: not measured")
            continue
        if not m.ok:
            parts.append(f"{backend} layer {TARGET_LAYER}: no figure ({m.status})")
            continue
        text = f"{backend} layer {TARGET_LAYER}: {m.wall_s:.1f} s (<= {target['wall_s']:.0f})"
        if "peak_anon_gib" in target:
            text += f", {m.peak_anon_gib:.2f} GiB (<= {target['peak_anon_gib']})"
        met = m.wall_s <= target["wall_s"] and m.peak_anon_gib <= target.get("peak_anon_gib", float("inf"))
        parts.append(text + (" met" if met else " MISSED"))
    return "Targets: " + "; ".join(parts)


# --- the run ---------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, memory, load, date and the versions that produced the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: platform's name stays
    versions = {}
    for package in ("pyactadd", "llama_cpp_python", "torch", "transformers", "gguf", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": versions,
    }


def warm_page_cache(path: Path) -> float:
    """Read the whole file once, so every measurement starts with it in the page cache; seconds taken."""
    start = time.perf_counter()
    buffer = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - start


def ours(path: Path) -> bool:
    """Whether ``path`` carries a stamp of the synthetic 8B shape (so it may be rewritten when stale)."""
    try:
        return json.loads(stamp_path(path).read_text())["shape"]["name"] == "llama3-8b"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def model_info(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Write or reuse the synthetic model (a given file without a stamp is used as it is); its facts."""
    path = Path(args.model_file or default_model_file())
    written = False
    if not path.exists() or ours(path):  # never overwrite another model, nor another shape's file
        print(f"[scale] model: {path} (written once, then reused)", file=sys.stderr, flush=True)
        written = write_synthetic(path, "llama3-8b", "Q8_0", progress=True).written
    header = read_header(path, arrays=False)
    name = header.metadata.get("general.name")
    info = {
        "path": str(path),
        "name": name.value if name else path.name,
        "size_gib": round(path.stat().st_size / GiB, 2),
        "written_now": written,
        "n_params": sum(t.n_elements for t in header.tensors),
    }
    info["page_cache_read_s"] = round(warm_page_cache(path), 1)
    return path, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-file", type=Path, help=f"the synthetic model (written there when missing; default {default_model_file()})")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "scale.json")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the speed section")
    parser.add_argument("--max-anon-gib", type=float, default=8.0, help="kill a command whose anonymous memory passes this")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="kill a command that runs longer")
    parser.add_argument("--min-free-gib", type=float, default=10.0, help="kill a command when the disk has less free")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the speed section")
    parser.add_argument("--n-prompt", type=int, default=64)
    parser.add_argument("--n-gen", type=int, default=16)
    parser.add_argument("--measure-old", action="store_true", help="also run the whole-model float32 load up to the caps")
    parser.add_argument("--skip-speed", action="store_true", help="skip steered vs unsteered speed")
    parser.add_argument("--skip-extract", action="store_true", help="skip the extraction jobs (the speed section steers with random rows)")
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace, model: Path, report: dict[str, Any]) -> None:
    """The extraction jobs, the old path and the speed section, into ``report``."""
    with tempfile.TemporaryDirectory(prefix="pyactadd-scale-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYACTADD_CACHE_DIR": str(work / "cache")}
        extracted = {} if args.skip_extract else extract_section(model, work, args, env)
        report["extract"] = {backend: {job: asdict(m) for job, m in jobs.items()} for backend, jobs in extracted.items()}
        n_params = report["model"]["n_params"]
        report["old_path"] = {"n_params": n_params, "computed_gib": n_params * 4 / GiB}
        if args.measure_old:
            report["old_path"]["measured"] = asdict(old_path_measured(model, work, args, env))
        report["backend_row_cosine"] = backend_agreement(extracted)
        if not args.skip_speed:
            try:
                report["speed"] = speed_section(model, extracted, args)
            except Exception as exc:  # llama.cpp refusing the model is a result to report
                report["speed_error"] = f"{type(exc).__name__}: {exc}"
        report["targets"] = targets_line(extracted)
        report["tables"] = [extract_table(extracted), old_table(report["old_path"])]
        if "speed" in report:
            report["tables"].append(speed_table(report["speed"]))
        elif "speed_error" in report:
            report["tables"].append(f"### Steered vs unsteered\n\nnot measured: {report['speed_error']}\n")
        report["tables"].append(agreement_table(report["backend_row_cosine"]))


def main(argv: list[str] | None = None) -> int:
    """Measure everything, print the tables and the targets, write ``--json``."""
    args = parse_args(argv)
    command = "python benchmarks/scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {"command": command.strip(), "machine": machine_info(args.threads)}
    model, report["model"] = model_info(args)
    run_all(args, model, report)
    m = report["machine"]
    print(f"{report['model']['name']} ({report['model']['size_gib']} GiB) on {m['cpu']}, "
          f"{m['cores']} cores, {m['threads']} threads, Python {m['python']}, {m['date']}\n")
    print("\n".join(report["tables"]))
    print(report["targets"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
