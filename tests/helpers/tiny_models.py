"""Tiny random-initialised transformers models of each streaming architecture, converted to GGUF by llama.cpp.

Each model is built from a config with a fixed seed (every parameter then gets seeded
noise, so norms, biases and the Q/K permutation are all exercised), saved with
``save_pretrained`` next to SmolLM2's tokenizer (read from the default model's GGUF by
transformers), and converted with llama.cpp's own ``convert_hf_to_gguf.py --outtype f32``
from the pinned llama-cpp-python sdist (:func:`helpers.llama_cpp_loader.sdist_path`),
offline. Results are cached under ``<cache>/tiny-models/`` (``<cache>`` as in
:func:`pyactadd.extract.torch_model.cache_root`), keyed by a hash of the config and the
transformers version, so reruns only load them.

Converter workarounds (what convert_hf_to_gguf accepts without sentencepiece installed):
llama, mistral, qwen2, qwen3 and gemma3 take SmolLM2's BPE ``tokenizer.json``; phi3 takes
it when ``tokenizer_config.json`` says ``GPT2Tokenizer`` (the Phi-4 route); gemma2's
converter insists on a sentencepiece ``tokenizer.model``, so its ``set_vocab`` is pointed
at the BPE route (the tokenizer does not touch the weights or the forward pass); an
unknown pre-tokenizer hash (qwen2's tokenizer class) falls back to ``smollm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from helpers.llama_cpp_loader import LLAMA_CPP_PYTHON_VERSION, sdist_path
from pyactadd.extract.torch_model import cache_root

VOCAB = 49152
_SDIST_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHS: dict[str, dict] = {
    "llama": dict(rope_theta=10000.0),
    "mistral": dict(rope_theta=10000.0, sliding_window=None, head_dim=16),
    "qwen2": dict(rope_theta=10000.0),
    # GGUF's attention.key_length is not in transformers' qwen3 config table, so a file
    # loads with Qwen3Config's default head_dim (128, every real Qwen3's): match it.
    "qwen3": dict(rope_theta=10000.0, head_dim=128),
    # gemma2 / gemma3: llama.cpp scales queries by 1/sqrt(head_dim) and GGUF keeps no
    # query_pre_attn_scalar, so head_dim = query_pre_attn_scalar = 256 (the defaults) keeps
    # the converted file equal to the original; a short sliding window so that prompts of a
    # few tokens exercise it.
    "gemma2": dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=3, num_hidden_layers=4,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    # GGUF keeps no layer_types; llama.cpp and transformers both use the default pattern
    # (every 6th layer full), so 7 layers reach one full-attention block.
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=3, num_hidden_layers=7),
    "phi3": dict(num_key_value_heads=4, rope_theta=10000.0, original_max_position_embeddings=512),
}
"""transformers model_type -> its config beyond :data:`_COMMON`."""


def root() -> Path:
    return cache_root() / "tiny-models"


def _key(model_type: str) -> str:
    import transformers

    blob = json.dumps([model_type, _COMMON, ARCHS[model_type], transformers.__version__, 2], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _tokenizer_dir() -> Path:
    """SmolLM2's tokenizer saved by transformers from the default model's GGUF (cached)."""
    target = root() / "tokenizer-smollm2"
    if (target / "tokenizer.json").is_file():
        return target
    import pyactadd
    from transformers import AutoTokenizer

    gguf_path = Path(pyactadd.default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = Path(tempfile.mkdtemp(dir=root()))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, target)
    return target


def _converter_dir() -> Path:
    """convert_hf_to_gguf.py, its conversion package and gguf-py, unpacked from the sdist (cached)."""
    target = root() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=root()))
    with tarfile.open(sdist_path()) as tar:
        members = [
            m for m in tar.getmembers()
            if m.name == _SDIST_PREFIX + "convert_hf_to_gguf.py"
            or m.name.startswith((_SDIST_PREFIX + "conversion/", _SDIST_PREFIX + "gguf-py/"))
        ]
        if not members:
            raise RuntimeError(f"{sdist_path()} has no {_SDIST_PREFIX}convert_hf_to_gguf.py")
        for member in members:
            member.name = member.name[len(_SDIST_PREFIX):]
        tar.extractall(tmp, members=members, filter="data")
    os.replace(tmp, target)
    return target


_RUNNER = r"""
import importlib.machinery, runpy, sys, types
sys.path.insert(0, {conv!r})
# sentencepiece is not installed: a stub lets the converters' "import, then look for
# tokenizer.model" fall through to their tokenizer.json routes.
stub = types.ModuleType("sentencepiece")
stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
stub.SentencePieceProcessor = None
sys.modules.setdefault("sentencepiece", stub)
if {gemma2}:
    import conversion.gemma as g
    g.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()
import conversion.base as b
_pre = b.TextModel.get_vocab_base_pre
def _pre_or_smollm(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        return "smollm"
b.TextModel.get_vocab_base_pre = _pre_or_smollm
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outtype", "f32", "--outfile", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def _save_random_model(model_type: str, directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_COMMON, **ARCHS[model_type]})
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(5678)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * (0.1 if parameter.ndim == 1 else 0.05))
    model.save_pretrained(str(directory))
    for item in _tokenizer_dir().iterdir():
        shutil.copy(item, directory / item.name)
    if model_type == "phi3":
        tokenizer_config = directory / "tokenizer_config.json"
        settings = json.loads(tokenizer_config.read_text())
        settings["tokenizer_class"] = "GPT2Tokenizer"
        tokenizer_config.write_text(json.dumps(settings))


def build(model_type: str) -> tuple[Path, Path]:
    """``(hf_dir, gguf_path)`` of the tiny ``model_type`` model, built and converted once."""
    name = f"tiny-{model_type.replace('_text', '')}-{_key(model_type)}"
    hf_dir, gguf_path = root() / name, root() / f"{name}.gguf"
    if gguf_path.is_file() and (hf_dir / "config.json").is_file():
        return hf_dir, gguf_path
    root().mkdir(parents=True, exist_ok=True)
    conv = _converter_dir()
    tmp = Path(tempfile.mkdtemp(dir=root()))
    _save_random_model(model_type, tmp)
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)
    out = gguf_path.with_suffix(".tmp")
    code = _RUNNER.format(
        conv=str(conv), gemma2=model_type == "gemma2", src=str(hf_dir), out=str(out), script=str(conv / "convert_hf_to_gguf.py")
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(conv))
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed for {model_type}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    os.replace(out, gguf_path)
    return hf_dir, gguf_path
