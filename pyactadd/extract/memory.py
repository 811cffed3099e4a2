"""How much memory an extraction will take, from the GGUF header alone, and the refusal when it does not fit.

Checked before anything is dequantized or loaded, so a job too large for the machine
ends with one line instead of the kernel's OOM killer. The estimate is the peak
*anonymous* memory (the model file's memory-mapped pages are page cache, not a cost):

* ``weights``: streaming (:mod:`pyactadd.extract.streaming`): the largest float32 block
  among the blocks run (one block is resident at a time; each tensor is dequantized a
  chunk of rows at a time into its place) plus one chunk; the whole model: every tensor
  in float32;
* ``embedding``: streaming reads only the job's distinct tokens' rows;
* ``activations``: for every batch held at once (streaming holds all of the job's, the
  whole model one at a time): the residual stream and its copies, the MLP's
  intermediates, attention scores, and the captured block inputs of every requested layer;
* ``runtime``: Python with torch (and transformers for streaming) imported.

:func:`free_memory_bytes` is MemAvailable, or what the cgroup still allows when that is lower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pyactadd.errors import InputError
from pyactadd.extract.gguf_tensors import CHUNK_BYTES
from pyactadd.gguf_header import TensorInfo
from pyactadd.host_memory import free_memory_bytes

GiB = 1 << 30
MiB = 1 << 20

# Anonymous memory of the interpreter with what each path imports (torch; torch and
# transformers), rounded up; docs/performance.md has the measurement.
RUNTIME_BYTES = {"whole": 200 * MiB, "stream": 340 * MiB}
RESIDUAL_COPIES = 4  # hidden, normed, attention output, residual sum
SLACK = 1.10  # allocator fragmentation and small objects
DEQUANT_TEMPORARIES = 4  # gguf-py's temporaries for one chunk, in chunks

_BLOCK = re.compile(r"blk\.(0|[1-9][0-9]*)\.")


class NotEnoughMemory(InputError):
    """The job's estimated peak memory is more than the machine has free."""


@dataclass(frozen=True)
class Job:
    """The shape of an extraction job: what the activations' memory follows from."""

    batches: Sequence[tuple[int, int]]  # (prompts, tokens per prompt) of each batch
    layers: Sequence[int]  # sorted block-input layers
    n_embd: int
    n_ff: int
    n_head: int


@dataclass(frozen=True)
class Estimate:
    """The parts of the estimate, in bytes; :attr:`total` adds :data:`SLACK`."""

    weights: int
    embedding: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return int((self.weights + self.embedding + self.activations + self.runtime) * SLACK)


def _batch_activations(prompts: int, tokens: int, job: Job) -> int:
    residual = prompts * tokens * job.n_embd
    return 4 * (
        residual * RESIDUAL_COPIES
        + prompts * tokens * job.n_ff * 3
        + prompts * job.n_head * tokens * tokens * 2
        + residual * len(job.layers)
    )


def block_float32_bytes(tensors: Iterable[TensorInfo], blocks: range) -> int:
    """The float32 size of the largest of ``blocks`` (``blk.N.`` tensors), plus the transient of filling it.

    The transient: gguf-py's temporaries for one chunk, and a second copy of the largest
    Q or K matrix (llama's reverse permutation makes a new array).
    """
    sizes: dict[int, int] = {}
    permuted = 0
    for info in tensors:
        match = _BLOCK.match(info.name)
        if match and int(match[1]) in blocks:
            sizes[int(match[1])] = sizes.get(int(match[1]), 0) + 4 * info.n_elements
            if ".attn_q." in info.name or ".attn_k." in info.name:
                permuted = max(permuted, 4 * info.n_elements)
    return max(sizes.values(), default=0) + DEQUANT_TEMPORARIES * CHUNK_BYTES + permuted


def streaming_estimate(tensors: Sequence[TensorInfo], job: Job, n_distinct_tokens: int) -> Estimate:
    """Peak memory of streaming ``job`` through blocks ``0 .. max(layers) - 1``, all batches held at once."""
    active = sum(_batch_activations(prompts, tokens, job) for prompts, tokens in job.batches)
    return Estimate(
        weights=block_float32_bytes(tensors, range(max(job.layers))),
        embedding=4 * n_distinct_tokens * job.n_embd,
        activations=active,
        runtime=RUNTIME_BYTES["stream"],
    )


def whole_model_estimate(tensors: Sequence[TensorInfo], job: Job) -> Estimate:
    """Peak memory of the whole model in float32 and ``job``'s batches run one at a time."""
    largest = max((_batch_activations(prompts, tokens, job) for prompts, tokens in job.batches), default=0)
    return Estimate(
        weights=sum(4 * info.n_elements for info in tensors),
        embedding=0,
        activations=largest,
        runtime=RUNTIME_BYTES["whole"],
    )


def gib(n_bytes: int) -> str:
    """``n_bytes`` in GiB, one decimal (two below 1 GiB)."""
    value = n_bytes / GiB
    return f"{value:.1f}" if value >= 0.95 else f"{value:.2f}"


def check_fits(estimate: Estimate, what: str, fix: str, *, free: int | None = None) -> None:
    """Refuse a job whose estimate is over the free memory (nothing is checked when that is unknown).

    Raises:
        NotEnoughMemory: one line: ``what`` needs about X GiB, Y GiB is free, and ``fix``.
    """
    free = free_memory_bytes() if free is None else free
    if free is not None and estimate.total > free:
        raise NotEnoughMemory(f"{what} needs about {gib(estimate.total)} GiB of memory and {gib(free)} GiB is free: {fix}")
