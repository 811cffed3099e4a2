"""Runs INSIDE the peers' virtual environment (repeng, steering-vectors, dialz; numpy < 2, transformers < 5).

Started by ``check_peers.py`` with one argument, a JSON job file. Imports nothing from
pyactadd. Writes into the job's ``out_dir``:

* ``probe.npz``: ``hidden_states`` of a probe prompt, so the driver can prove both
  environments run the same model (same weights, same config, same tokens);
* ``sv_mean.npz`` / ``sv_mean.pt`` / ``sv_pca.npz``: steering-vectors'
  ``train_steering_vector`` with ``mean_aggregator`` / ``pca_aggregator``, keyed by its layer
  number (the output of block i);
* ``repeng_pca_diff.gguf``: repeng's ``ControlVector.train(method="pca_diff")`` written by its
  own ``export_gguf``; ``repeng_steer.gguf``: the same vector on the steered layers only;
* ``dialz.gguf``: repeng's directions written by dialz's ``SteeringVector.export_gguf``;
* ``steering.npz``: last-token logits of each steering prompt without and with repeng's
  ``ControlModel`` applying ``repeng_steer.gguf``'s vector at ``steer_coeff``;
* ``result.json``: versions and token checks.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(job.get("threads", 2))
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        stages[name] = round(time.perf_counter() - started - sum(stages.values()), 1)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The weights: pyactadd's float32 conversion of the default GGUF (see check_peers.py).
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], torch_dtype=torch.float32).eval()
    # The tokenizer: transformers 4.x builds it from the GGUF itself (vocab only, fast).
    gguf = Path(job["gguf_path"])
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "right"  # repeng and steering-vectors both handle right padding exactly
    # transformers 4.x's GGUF tokenizer adds BOS, but llama.cpp follows the GGUF's
    # tokenizer.ggml.add_bos_token (false for SmolLM2); use llama.cpp's choice (checked below).
    tokenizer.add_bos_token = bool(job["adds_bos"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # Same tokens as llama.cpp? (the driver sends llama.cpp's ids for every prompt)
    mismatches = []
    for text, expected in job["expected_ids"].items():
        got = tokenizer(text, add_special_tokens=True)["input_ids"]
        if got != expected:
            mismatches.append({"text": text, "llama_cpp": expected, "transformers": got})
    stage("load model and tokenizer")

    with torch.inference_mode():
        probe = model(input_ids=torch.tensor([job["probe_ids"]]), output_hidden_states=True).hidden_states
    np.savez(out / "probe.npz", **{str(i): h[0].numpy() for i, h in enumerate(probe)})

    pairs = [(p["positive"], p["negative"]) for p in job["pairs"]]
    layers = job["layers"]  # block indices (block-output convention)

    # steering-vectors: mean and PCA aggregators.
    stage("probe")
    from steering_vectors import mean_aggregator, pca_aggregator, train_steering_vector

    for name, aggregator in (("mean", mean_aggregator()), ("pca", pca_aggregator())):
        sv = train_steering_vector(model, tokenizer, pairs, layers=layers, aggregator=aggregator, batch_size=8)
        arrays = {str(layer): tensor.detach().float().numpy() for layer, tensor in sv.layer_activations.items()}
        np.savez(out / f"sv_{name}.npz", **arrays)
        if name == "mean":
            torch.save(dict(sv.layer_activations), out / "sv_mean.pt")

    stage("steering-vectors")
    # repeng: PCA of the differences (its default method), written by its own export_gguf.
    from repeng import ControlModel, ControlVector, DatasetEntry

    dataset = [DatasetEntry(positive=p, negative=n) for p, n in pairs]
    vector = ControlVector.train(model, tokenizer, dataset, hidden_layers=layers, method="pca_diff", batch_size=8)
    vector.export_gguf(str(out / "repeng_pca_diff.gguf"))
    steer_layers = job["steer_layers"]
    steer_vector = ControlVector(model_type=vector.model_type, directions={i: vector.directions[i] for i in steer_layers})
    steer_vector.export_gguf(str(out / "repeng_steer.gguf"))

    stage("repeng train")
    # dialz: the same directions through dialz's own writer. dialz/__init__ imports its
    # plotting module (IPython), so import dialz.vector without running the package __init__.
    spec = importlib.util.find_spec("dialz")
    package = types.ModuleType("dialz")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["dialz"] = package
    from dialz.vector import SteeringVector as DialzVector

    DialzVector(model_type=vector.model_type, directions=dict(vector.directions)).export_gguf(str(out / "dialz.gguf"))

    # repeng's ControlModel steering PyTorch: last-token logits without and with the vector.
    controlled = ControlModel(model, steer_layers)
    logits = {}
    with torch.inference_mode():
        for index, ids in enumerate(job["steer_prompt_ids"]):
            controlled.reset()
            base = controlled(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
            controlled.set_control(steer_vector, job["steer_coeff"])
            steered = controlled(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
            controlled.reset()
            logits[f"base_{index}"] = base
            logits[f"steered_{index}"] = steered
    np.savez(out / "steering.npz", **logits)
    stage("dialz and ControlModel")

    import repeng
    import sklearn
    import steering_vectors

    result = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__,
            "repeng": getattr(repeng, "__version__", _dist_version("repeng")),
            "steering-vectors": getattr(steering_vectors, "__version__", _dist_version("steering-vectors")),
            "dialz": _dist_version("dialz"),
        },
        "token_mismatches": mismatches,
        "seconds": round(time.perf_counter() - started, 1),
        "stages": stages,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
