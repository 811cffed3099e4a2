"""GGUF model files made from another one for error tests: another architecture, a type PyTorch cannot read, cut short."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def rewrite(
    src: Path, dst: Path, *, architecture: str | None = None, retype: str | None = None, q8_0: bool = False
) -> Path:
    """``src`` rewritten to ``dst``: renamed to ``architecture`` (its ``llama.*`` keys too), with
    tensor ``retype`` stored as F64 (a type gguf-py does not dequantize), or (``q8_0``) every
    float32 matrix quantized to Q8_0 by gguf-py."""
    reader = gguf.GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    new = architecture or old
    writer = gguf.GGUFWriter(str(dst), new)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = new + name[len(old):] if name.startswith(old + ".") else name
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name == retype:
            writer.add_tensor(tensor.name, np.asarray(tensor.data, dtype=np.float64))
        elif q8_0 and tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 2:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor.name, gguf.quants.quantize(np.array(tensor.data), kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def cut_short(src: Path, dst: Path, n_bytes: int = 1000) -> Path:
    """``src`` without its last ``n_bytes`` (a download that stopped early)."""
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) - n_bytes])
    return dst
