#!/usr/bin/env python3
"""Check pyactadd's many-pair methods and readers against the real peer libraries.

repeng (numpy < 2) and steering-vectors / dialz (transformers < 5) cannot share pyactadd's
environment, so this script

1. builds ``build/peers-venv`` with ``tests/peers/requirements.txt`` (cached: rebuilt only
   when the pinned requirements or the Python version change);
2. gives the peers the very model pyactadd extracts with: pyactadd's float32 conversion of
   the default GGUF (its weight cache), with ``rope_theta`` spelled for transformers 4.x,
   and the tokenizer transformers 4.x builds from the same GGUF; then checks both
   environments compute the same hidden states and the same token ids;
3. runs ``peer_worker.py`` in the venv: steering-vectors (mean and PCA aggregators), repeng
   (``pca_diff``, its ``export_gguf``, its ``ControlModel``) and dialz (``export_gguf``) on
   ``tests/peers/pairs.jsonl``;
4. compares, in this environment:

   ===========================================  ===================================  ==========
   pyactadd                                      peer                                 check
   ===========================================  ===================================  ==========
   ``extract_pairs(method="mean")``             steering-vectors ``mean_aggregator``  cos >= .99
   ``extract_pairs(method="pca")``              steering-vectors ``pca_aggregator``   cos >= .99
   ``extract_pairs(method="pca", pca_center)``  repeng ``pca_diff``                   cos >= .99
   repeng GGUF steering ``pyactadd run``'s path  repeng ``ControlModel`` in PyTorch     corr >= .9
   ===========================================  ===================================  ==========

   per layer, for every layer (pyactadd L = 1..29 = the peers' block outputs 0..28), plus
   exact reads of steering-vectors' ``.pt`` and dialz's GGUF.

Prints a PASS/FAIL table and exits non-zero on any failure. Run from the repository root
(``.ci/run`` does): ``python3 tests/peers/check_peers.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build"
VENV = BUILD / "peers-venv"
WORK = BUILD / "peers"
REQUIREMENTS = HERE / "requirements.txt"
PAIRS = HERE / "pairs.jsonl"

LAYERS = list(range(1, 30))  # pyactadd L = 1..29, the peers' block outputs 0..28
STEER_LAYERS = list(range(4, 12))  # repeng's block indices for the steering check (pyactadd L 5..12)
STEER_COEFF = 8.0  # per layer, on unit vectors; weaker pushes drown in Q4_1 llama.cpp's logit noise (~0.1 per logit)
STEER_PROMPTS = ["I went to the park and", "My opinion of the movie is that", "Yesterday my neighbour told me"]
PROBE = "Peer check: the same model in two environments."
COSINE_MIN = 0.99
DECISIVE = 0.75  # a layer's sign is decided when at least this share of pairs fall on one side of the axis
CORRELATION_MIN = 0.9
PROBE_TOLERANCE = 1e-4  # max |difference| / max |hidden state|, over all hidden states


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool]] = []

    def check(self, name: str, value: str, ok: bool) -> bool:
        self.rows.append((name, value, bool(ok)))
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value}", flush=True)
        return ok

    @property
    def failed(self) -> int:
        return sum(not ok for *_, ok in self.rows)


def log(message: str) -> None:
    print(f"peers: {message}", flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> str:
    """Create (or reuse) the peers' virtual environment; return "cached" or "built"."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()
    stamp = VENV / ".requirements-sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest and venv_python().is_file():
        return "cached"
    if VENV.exists():
        shutil.rmtree(VENV)
    BUILD.mkdir(exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    log(f"building {VENV.relative_to(ROOT)} (several minutes; cached afterwards)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip_log = WORK / "pip.log"
    with open(pip_log, "w") as handle:
        done = subprocess.run(
            [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = pip_log.read_text().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"peers: pip could not install {REQUIREMENTS.relative_to(ROOT)} (log: {pip_log})")
    stamp.write_text(digest + "\n")
    return "built"


def peer_model_dir(gguf_path: Path) -> Path:
    """pyactadd's float32 conversion of the GGUF, as a directory transformers 4.x reads the same way."""
    from pyactadd.extract import torch_model

    torch_model.load_torch_model(gguf_path, progress=True)  # converts once into pyactadd's cache
    entry = torch_model.cache_entry(gguf_path)
    if not (entry / "model.safetensors").is_file():
        raise SystemExit(f"peers: pyactadd's converted weights are not in {entry}: is the cache directory writable?")
    target = WORK / "model"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / "model.safetensors").symlink_to(entry / "model.safetensors")
    config = json.loads((entry / "config.json").read_text())
    # transformers 5 writes rope_parameters; 4.x reads rope_theta and would silently use 10000.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") == "default":
            config["rope_scaling"] = None
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare_layers(report: Report, name: str, mine, theirs, note: str = "") -> None:
    """Cosine per layer between two SteeringVectors over the same layers."""
    layers = mine.layer_ids
    if not report.check(f"{name}: same layers", f"pyactadd {layers[0]}..{layers[-1]}, peer {theirs.layer_ids[0]}..{theirs.layer_ids[-1]}", theirs.layer_ids == layers):
        return
    cosines = {layer: cosine(mine.layers[layer], theirs.layers[layer]) for layer in layers}
    worst = min(cosines, key=cosines.get)
    ratios = [float(np.linalg.norm(mine.layers[l]) / np.linalg.norm(theirs.layers[l])) for l in layers]
    report.check(
        f"{name}: cosine per layer >= {COSINE_MIN}",
        f"min {cosines[worst]:.6f} (L {worst}; 1 - cos = {1 - cosines[worst]:.1e}), median {np.median(list(cosines.values())):.6f}; "
        f"norm ratio pyactadd/peer {min(ratios):.4g}..{max(ratios):.4g}{note}",
        cosines[worst] >= COSINE_MIN,
    )


def compare_repeng(report: Report, mine, theirs, activations) -> None:
    """Centered PCA against repeng's pca_diff: the same axis everywhere, the same sign where the sign is decided.

    Both find the first principal component of the centered differences; they differ in
    how they pick its sign. pyactadd keeps the mean difference's own projection on the
    axis (the result, (mean . u) u, does not depend on u's sign); repeng flips u when
    more pairs have their positive prompt below their negative on it, and keeps
    scikit-learn's arbitrary SVD sign on a tie. On a layer where the pairs split about
    evenly the centered component says little about positive vs negative and either sign
    is a guess, so the signed check covers the layers where at least DECISIVE of the pairs
    agree.
    """
    name = "pca --pca-center vs repeng pca_diff"
    layers = mine.layer_ids
    if not report.check(f"{name}: same layers", f"{layers[0]}..{layers[-1]}", theirs.layer_ids == layers):
        return
    axis = {layer: abs(cosine(mine.layers[layer], theirs.layers[layer])) for layer in layers}
    worst = min(axis, key=axis.get)
    report.check(
        f"{name}: |cosine| per layer >= {COSINE_MIN} (same axis)",
        f"min {axis[worst]:.6f} (L {worst}; 1 - |cos| = {1 - axis[worst]:.1e})",
        axis[worst] >= COSINE_MIN,
    )
    decisive, split = [], []
    for layer in layers:
        positive, negative = activations[layer]
        direction = theirs.layers[layer][0].astype(np.float64)
        above = float(np.mean((positive.astype(np.float64) - negative) @ direction > 0))
        (decisive if max(above, 1 - above) >= DECISIVE else split).append((layer, above))
    signed = {layer: cosine(mine.layers[layer], theirs.layers[layer]) for layer, _ in decisive}
    low = min(signed, key=signed.get) if signed else None
    report.check(
        f"{name}: cosine >= {COSINE_MIN} where >= {DECISIVE:.0%} of pairs pick the side",
        (f"{len(decisive)} layers, min {signed[low]:.6f} (L {low}; 1 - cos = {1 - signed[low]:.1e})" if signed else "no decisive layer")
        + f"; split layers (share of pairs with positive above negative on repeng's axis): "
        + ", ".join(f"L{layer} {share:.0%}" for layer, share in split),
        bool(signed) and signed[low] >= COSINE_MIN,
    )


def main() -> int:
    os.chdir(ROOT)
    started = time.perf_counter()
    report = Report()
    WORK.mkdir(parents=True, exist_ok=True)
    state = ensure_venv()
    t_venv = time.perf_counter() - started
    log(f"venv {state} in {t_venv:.0f} s")

    import torch

    from pyactadd.vector.convert import load, read_vector
    from pyactadd.default_model import default_model_path
    from pyactadd.runtime.generate import load_llama, prompt_tokens
    from pyactadd.extract.pairs import extract_pairs, last_token_activations
    from pyactadd.prompts.pairs import load_pairs
    from pyactadd.runtime.steering import Steering
    from pyactadd.prompts.tokens import Tokenizer
    from pyactadd.vector.value import SteeringVector

    gguf_path = default_model_path()
    model_dir = peer_model_dir(gguf_path)
    tokenizer = Tokenizer.from_model(gguf_path)
    pairs = load_pairs(PAIRS)
    texts = [text for pair in pairs for text in (pair.positive, pair.negative)] + STEER_PROMPTS + [PROBE]
    out = WORK / "out"
    if out.exists():
        shutil.rmtree(out)
    job = {
        "out_dir": str(out),
        "model_dir": str(model_dir),
        "gguf_path": str(gguf_path),
        "pairs": [{"positive": p.positive, "negative": p.negative} for p in pairs],
        "expected_ids": {text: tokenizer.encode(text) for text in texts},
        "probe_ids": tokenizer.encode(PROBE),
        "adds_bos": tokenizer.adds_bos,
        "layers": [layer - 1 for layer in LAYERS],
        "steer_layers": STEER_LAYERS,
        "steer_coeff": STEER_COEFF,
        "steer_prompt_ids": [tokenizer.encode(text) for text in STEER_PROMPTS],
        "threads": max(1, min(os.cpu_count() or 1, 4)),
    }
    job_file = WORK / "job.json"
    job_file.write_text(json.dumps(job))

    log("running repeng, steering-vectors and dialz in the peers' environment")
    t0 = time.perf_counter()
    # Bytecode caching on (inside build/): without it every run recompiles transformers' modules.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["TOKENIZERS_PARALLELISM"] = "false"
    done = subprocess.run([str(venv_python()), str(HERE / "peer_worker.py"), str(job_file)], env=env, cwd=WORK)
    t_peers = time.perf_counter() - t0
    if done.returncode != 0:
        report.check("peer worker", f"exit code {done.returncode}", False)
        return finish(report, started, t_venv, t_peers, 0.0)
    result = json.loads((out / "result.json").read_text())
    log(f"peers ran in {t_peers:.0f} s (worker stages, s: {result['stages']}) with {result['versions']}")

    # 1. Same model, same tokens in both environments.
    report.check("token ids: transformers 4.x from the GGUF == llama.cpp", f"{len(result['token_mismatches'])} of {len(texts)} prompts differ", not result["token_mismatches"])
    for mismatch in result["token_mismatches"][:3]:
        print(f"      {mismatch}")
    from pyactadd.extract.torch_model import load_torch_model

    torch_model = load_torch_model(gguf_path, progress=False)
    with torch.inference_mode():
        mine = torch_model(input_ids=torch.tensor([job["probe_ids"]]), output_hidden_states=True).hidden_states
    theirs = np.load(out / "probe.npz")
    worst = max(float(np.max(np.abs(h[0].numpy() - theirs[str(i)]))) / float(np.max(np.abs(h[0].numpy()))) for i, h in enumerate(mine))
    report.check("same model: hidden states of a probe prompt", f"max relative difference {worst:.2e} (limit {PROBE_TOLERANCE:g})", worst <= PROBE_TOLERANCE)

    # 2. Many-pair methods against the peers' own implementations.
    t0 = time.perf_counter()
    vectors = {
        "mean": extract_pairs(pairs, LAYERS, method="mean", progress=True),
        "pca": extract_pairs(pairs, LAYERS, method="pca", progress=True),
        "pca_center": extract_pairs(pairs, LAYERS, method="pca", pca_center=True, progress=True),
    }
    t_mine = time.perf_counter() - t0
    sv_mean = read_vector(out / "sv_mean.npz", layer_convention="block-output")
    sv_pca = read_vector(out / "sv_pca.npz", layer_convention="block-output")
    repeng_loaded = load(out / "repeng_pca_diff.gguf")
    compare_layers(report, "mean vs steering-vectors mean_aggregator", vectors["mean"], sv_mean)
    compare_layers(report, "pca vs steering-vectors pca_aggregator", vectors["pca"], sv_pca, " (the peer's is unit-norm)")
    compare_repeng(report, vectors["pca_center"], repeng_loaded.vector, last_token_activations(pairs, LAYERS))

    # 3. Readers on the files the peers wrote themselves.
    sv_pt = read_vector(out / "sv_mean.pt", layer_convention="block-output")
    report.check(
        "steering-vectors .pt (torch.save(layer_activations)) reads exactly",
        "block-output i -> L = i + 1",
        sv_pt.layer_ids == sv_mean.layer_ids and all(np.array_equal(sv_pt.layers[l], sv_mean.layers[l]) for l in sv_pt.layers),
    )
    dialz = load(out / "dialz.gguf")
    report.check(
        "dialz export_gguf reads exactly, detected as dialz",
        f"producer {dialz.producer}, layers {dialz.vector.layer_ids[0]}..{dialz.vector.layer_ids[-1]}",
        dialz.producer == "dialz"
        and dialz.vector.layer_ids == repeng_loaded.vector.layer_ids
        and all(np.array_equal(dialz.vector.layers[l], repeng_loaded.vector.layers[l]) for l in dialz.vector.layers),
    )
    report.check("repeng export_gguf detected as repeng", f"producer {repeng_loaded.producer}", repeng_loaded.producer == "repeng")

    # 4. A repeng-written GGUF steers llama.cpp (pyactadd run's path) as repeng steers PyTorch.
    steer = SteeringVector.load(out / "repeng_steer.gguf")
    report.check(
        "repeng_steer.gguf layers",
        f"repeng blocks {STEER_LAYERS[0]}..{STEER_LAYERS[-1]} -> pyactadd L {steer.layer_ids[0]}..{steer.layer_ids[-1]}",
        steer.layer_ids == [layer + 1 for layer in STEER_LAYERS],
    )
    import llama_cpp

    llama = load_llama(gguf_path, n_ctx=256)
    steering = Steering.of(llama)
    logits = np.load(out / "steering.npz")
    n_vocab = llama.n_vocab()

    def last_logits(ids: list[int]) -> np.ndarray:
        llama.reset()
        llama.eval(ids)
        pointer = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64).copy()

    for index, text in enumerate(STEER_PROMPTS):
        ids = prompt_tokens(llama, text)
        steering.clear()
        base = last_logits(ids)
        steering.set([(steer, STEER_COEFF)])
        steered = last_logits(ids)
        steering.clear()
        mine_delta = steered - base
        theirs_delta = logits[f"steered_{index}"].astype(np.float64) - logits[f"base_{index}"].astype(np.float64)
        corr = float(np.corrcoef(mine_delta, theirs_delta)[0, 1])
        report.check(
            f"steering {text!r}: corr(llama.cpp logit change, repeng ControlModel logit change) >= {CORRELATION_MIN}",
            f"{corr:.4f} (|change| llama.cpp {np.linalg.norm(mine_delta):.1f}, PyTorch {np.linalg.norm(theirs_delta):.1f})",
            corr >= CORRELATION_MIN,
        )
    del llama
    cli = subprocess.run(
        [sys.executable, "-c", "from pyactadd.cli import main; main()", "run", STEER_PROMPTS[0],
         "--steer", f"{out / 'repeng_steer.gguf'}:{STEER_COEFF}", "--compare", "--temperature", "0", "--max-tokens", "16"],
        capture_output=True, text=True,
    )
    print(cli.stdout.rstrip())
    report.check("pyactadd run --steer repeng_steer.gguf --compare", f"exit code {cli.returncode}", cli.returncode == 0)
    return finish(report, started, t_venv, t_peers, t_mine)


def finish(report: Report, started: float, t_venv: float, t_peers: float, t_mine: float) -> int:
    total = time.perf_counter() - started
    print()
    print(f"peers: {len(report.rows) - report.failed} passed, {report.failed} failed "
          f"(venv {t_venv:.0f} s, peers {t_peers:.0f} s, pyactadd extraction {t_mine:.0f} s, total {total:.0f} s)")
    print("PEERS: " + ("PASS" if report.failed == 0 and report.rows else "FAIL"))
    return 0 if report.failed == 0 and report.rows else 1


if __name__ == "__main__":
    sys.exit(main())
