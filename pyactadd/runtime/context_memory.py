"""The memory a llama.cpp context will take, checked against free memory before llama.cpp
allocates it: a cache larger than memory gets the process killed instead of an error."""

from __future__ import annotations

from pathlib import Path

from pyactadd.host_memory import free_memory_bytes

_KV_BYTES = 2  # llama.cpp's default KV cache type is f16 (llama-cpp-python keeps it)
_CTX_PAD = 256  # llama.cpp rounds a context up to a multiple of 256
_USABLE_SHARE = 0.8  # of the available memory: llama.cpp's compute buffers and the rest of the process need room too


def context_memory_problem(model_path: Path, n_ctx: int, option: str = "--n-ctx") -> str | None:
    """Why ``n_ctx`` cannot be allocated, or None: refused if llama.cpp's KV cache for it would not fit in free memory.

    llama.cpp allocates the whole cache when it creates the context, and a cache larger
    than memory gets the process killed by the kernel instead of an error. The estimate
    (f16 keys and values, every layer, the context rounded up as llama.cpp rounds it) plus
    the weights must fit in most of the memory the system says is available. Models without
    the attention sizes in their header (recurrent ones), and systems that do not say
    how much is free, are not checked.

    Returns:
        one line naming the estimate, what is free, and the largest context that fits (``option``), or None.
    """
    per_token = _kv_bytes_per_token(model_path)
    free = free_memory_bytes()
    if per_token is None or free is None:
        return None
    padded = -(-n_ctx // _CTX_PAD) * _CTX_PAD
    weights = model_path.stat().st_size
    usable = int(free * _USABLE_SHARE)
    if weights + padded * per_token <= usable:
        return None
    fits = (usable - weights) // per_token
    fix = f"use {option} {1 << (fits.bit_length() - 1)} or less" if fits >= _CTX_PAD else "free memory or use a smaller model"
    return (
        f"{n_ctx} needs about {_gb(padded * per_token)} for llama.cpp's KV cache besides {_gb(weights)} of weights, "
        f"but {_gb(free)} of memory is available: {fix}"
    )


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def _kv_bytes_per_token(model_path: Path) -> int | None:
    """Bytes of KV cache per context position, from the model's GGUF header (None: unknown)."""
    from pyactadd.gguf_header import GGUFHeaderError, read_header

    try:
        metadata = read_header(model_path, arrays=False).metadata
    except (GGUFHeaderError, OSError):
        return None  # llama.cpp's own loader reports the file
    arch = getattr(metadata.get("general.architecture"), "value", None)

    def number(key: str):
        value = getattr(metadata.get(f"{arch}.{key}"), "value", None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    n_layer, n_embd, n_head = number("block_count"), number("embedding_length"), number("attention.head_count")
    if not (n_layer and n_embd and n_head):
        return None
    n_head_kv = number("attention.head_count_kv") or n_head
    k_length = number("attention.key_length") or n_embd // n_head
    v_length = number("attention.value_length") or n_embd // n_head
    return n_layer * n_head_kv * (k_length + v_length) * _KV_BYTES
