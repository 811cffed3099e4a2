"""A GGUF file with a real model's shape, random weights and a real tokenizer (for benchmarks).

``write_synthetic(path, shape="llama3-8b")`` writes a Llama-3-8B-shaped llama GGUF
(32 blocks, n_embd 4096, n_ff 14336, 32/8 heads, rope theta 500000, context 8192) whose
vocabulary and every ``tokenizer.*`` key are copied from another GGUF (by default
pyactadd's SmolLM2-135M, so the vocabulary is 49152 and ``token_embd`` is [49152, 4096]).
The ``tiny`` shape is the same code path at a size a test can write in seconds.

One block's tensors are drawn and quantized once and the same bytes are written for every
block: every block computes the same function, and nothing measured here depends on the
blocks differing, so the writer costs one block's quantization instead of 32. Weights are
normal(0, 0.02) before quantization and norms are 1, so the residual stream stays finite
through all blocks and llama.cpp generates (nonsense) text.

The file is cached: a sidecar ``<path>.json`` stamps the parameters and the size, and a
later call with the same parameters returns at once while the file still has that size.
The file is written to ``<path>.tmp`` and renamed, so a killed write leaves no stamp.

    python benchmarks/synthetic_gguf.py OUT.gguf [--shape llama3-8b|tiny] [--qtype Q8_0] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

from pyactadd.default_model import default_model_path

STAMP_FORMAT = 1
WEIGHT_STD = 0.02
CHUNK_ELEMENTS = 1 << 24  # quantize at most 16M floats (64 MB of float32) at a time


@dataclass(frozen=True)
class Shape:
    """The hyperparameters of a llama-architecture model (the vocabulary comes from the tokenizer file)."""

    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    rope_theta: float
    rms_eps: float
    n_ctx_train: int
    tied_output: bool  # True: no output.weight (llama.cpp reuses token_embd), as in SmolLM2

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES = {
    # Meta-Llama-3-8B's config.json (untied output head); the vocabulary is the tokenizer file's.
    "llama3-8b": Shape("llama3-8b", 32, 4096, 14336, 32, 8, 500000.0, 1e-5, 8192, tied_output=False),
    # For tests: the same code path, a few MB plus SmolLM2's vocabulary.
    "tiny": Shape("tiny", 4, 256, 512, 4, 2, 10000.0, 1e-5, 2048, tied_output=True),
}


@dataclass(frozen=True)
class Written:
    """What :func:`write_synthetic` did."""

    path: str
    size: int
    written: bool  # False: the cached file was reused
    seconds: float
    stamp: dict


def block_tensor_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """The tensors of one block in numpy order ([rows, cols], cols = the input dim), by GGUF suffix."""
    e, f, kv = shape.n_embd, shape.n_ff, shape.n_head_kv * shape.head_dim
    return {
        "attn_norm.weight": (e,),
        "attn_q.weight": (e, e),
        "attn_k.weight": (kv, e),
        "attn_v.weight": (kv, e),
        "attn_output.weight": (e, e),
        "ffn_norm.weight": (e,),
        "ffn_gate.weight": (f, e),
        "ffn_up.weight": (f, e),
        "ffn_down.weight": (e, f),
    }


def parameter_count(shape: Shape, vocab: int) -> int:
    """Number of weights in the model (what a float32 copy of it holds, at 4 bytes each)."""
    per_block = sum(int(np.prod(dims)) for dims in block_tensor_shapes(shape).values())
    heads = 1 if shape.tied_output else 2
    return shape.n_layer * per_block + heads * vocab * shape.n_embd + shape.n_embd


def random_quantized(rng: np.random.Generator, rows: int, cols: int, qtype: GGMLQuantizationType) -> np.ndarray:
    """normal(0, WEIGHT_STD) of shape [rows, cols], quantized in chunks into one byte array."""
    step = max(1, CHUNK_ELEMENTS // cols)
    parts = []
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        chunk *= WEIGHT_STD
        parts.append(quantize(chunk, qtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def copy_tokenizer(writer: GGUFWriter, tokenizer_from: str) -> int:
    """Copy every ``tokenizer.*`` key of ``tokenizer_from`` into ``writer``; return the vocabulary size."""
    vocab = None
    for key, field in GGUFReader(tokenizer_from).fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            values = field.contents()
            writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=field.types[1])
            if key == "tokenizer.ggml.tokens":
                vocab = len(values)
        else:
            writer.add_key_value(key, field.contents(), vtype)
    if vocab is None:
        raise ValueError(f"{tokenizer_from} has no tokenizer.ggml.tokens: name a GGUF model with --tokenizer-from")
    return vocab


def file_type(qtype: str) -> int:
    """``general.file_type`` for weights of ``qtype``."""
    return int(LlamaFileType.ALL_F32 if qtype == "F32" else LlamaFileType[f"MOSTLY_{qtype}"])


def make_stamp(shape: Shape, qtype: str, seed: int, tokenizer_from: str) -> dict:
    """The parameters a cached file must have been written with."""
    return {
        "format": STAMP_FORMAT,
        "shape": asdict(shape),
        "qtype": qtype,
        "seed": seed,
        "weight_std": WEIGHT_STD,
        "tokenizer_from": os.path.abspath(tokenizer_from),
        "tokenizer_size": os.path.getsize(tokenizer_from),
    }


def stamp_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that marks ``path`` as completely written."""
    return Path(str(path) + ".json")


def cached(path: str | os.PathLike[str], stamp: dict) -> bool:
    """True when ``path`` was written with ``stamp``'s parameters and still has the stamped size."""
    try:
        saved = json.loads(stamp_path(path).read_text())
        size = os.path.getsize(path)
    except (OSError, ValueError):
        return False
    return saved.get("size") == size and {k: saved.get(k) for k in stamp} == stamp


def model_writer(path: Path, spec: Shape, qtype: str, seed: int, tokenizer_from: str) -> tuple[GGUFWriter, int]:
    """A GGUFWriter with every metadata key of the model written; returns it and the vocabulary size."""
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"synthetic {spec.name} ({qtype}, random weights, seed {seed})")
    writer.add_type("model")
    writer.add_block_count(spec.n_layer)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_file_type(file_type(qtype))
    vocab = copy_tokenizer(writer, tokenizer_from)
    writer.add_vocab_size(vocab)
    writer.add_quantization_version(2)
    return writer, vocab


def add_tensors(writer: GGUFWriter, spec: Shape, vocab: int, qt: GGMLQuantizationType, seed: int) -> None:
    """Queue every tensor: the embedding, one block's tensors repeated per block, the head."""
    rng = np.random.default_rng(seed)
    ones = np.ones(spec.n_embd, dtype=np.float32)

    def add(name: str, data: np.ndarray) -> None:
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", random_quantized(rng, vocab, spec.n_embd, qt))
    block = {
        suffix: ones if len(dims) == 1 else random_quantized(rng, *dims, qt)
        for suffix, dims in block_tensor_shapes(spec).items()
    }
    for il in range(spec.n_layer):
        for suffix, data in block.items():
            add(f"blk.{il}.{suffix}", data)  # the same array object for every block: no copy in memory
    add("output_norm.weight", ones)
    if not spec.tied_output:
        add("output.weight", random_quantized(rng, vocab, spec.n_embd, qt))


def check_shape(spec: Shape, qtype: str) -> GGMLQuantizationType:
    """The ggml type of ``qtype``, after checking that the shape's rows fit its block size."""
    if qtype not in GGMLQuantizationType.__members__:
        raise ValueError(f"unknown ggml type {qtype!r}: use Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16 or F32")
    qt = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[qt][0]
    for dim in (spec.n_embd, spec.n_ff):
        if dim % block:
            raise ValueError(f"{qtype} needs rows that are a multiple of {block}; {spec.name} has {dim}")
    return qt


def write_synthetic(
    path: str | os.PathLike[str],
    shape: str = "llama3-8b",
    qtype: str = "Q8_0",
    seed: int = 0,
    tokenizer_from: str | None = None,
    *,
    force: bool = False,
    progress: bool = False,
) -> Written:
    """Write (or reuse) a synthetic GGUF of ``shape`` at ``path``; see the module docstring.

    ``qtype`` is the ggml type of the 2-D weights (any type gguf-py can quantize: Q8_0,
    Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32); norms are always F32.

    Raises:
        ValueError: an unknown shape or type, or a tokenizer file without a vocabulary.
        OSError: the file cannot be written.
    """
    start = time.perf_counter()
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(sorted(SHAPES))}")
    spec = SHAPES[shape]
    qt = check_shape(spec, qtype)
    tokenizer_from = str(tokenizer_from or default_model_path())
    stamp = make_stamp(spec, qtype, seed, tokenizer_from)
    path = Path(path)
    if not force and cached(path, stamp):
        return Written(str(path), path.stat().st_size, False, time.perf_counter() - start, stamp)
    stamp_path(path).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        writer, vocab = model_writer(tmp, spec, qtype, seed, tokenizer_from)
        add_tensors(writer, spec, vocab, qt, seed)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    stamp_path(path).write_text(json.dumps({**stamp, "size": size, "write_seconds": round(seconds, 2)}, indent=1))
    return Written(str(path), size, True, seconds, stamp)


def main(argv: list[str] | None = None) -> int:
    """The command line: write (or find cached) one synthetic file and say which."""
    parser = argparse.ArgumentParser(description="Write a synthetic GGUF of a real model's shape (cached).")
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--qtype", default="Q8_0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", help="GGUF whose tokenizer.* keys are copied (default: pyactadd's model)")
    parser.add_argument("--force", action="store_true", help="write even when a matching cached file exists")
    args = parser.parse_args(argv)
    try:
        result = write_synthetic(args.out, args.shape, args.qtype, args.seed, args.tokenizer_from, force=args.force, progress=True)
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    what = "wrote" if result.written else "cached"
    print(f"{what} {result.path}: {result.size} bytes ({result.size / 2**30:.2f} GiB) in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
