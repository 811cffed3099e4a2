"""A GGUF model file opened lazily: transformers' config, and one dequantized tensor at a time.

:class:`GGUFTensors` reads only the header (:mod:`pyactadd.gguf_header`, metadata arrays
skipped) and memory-maps the file; tensor data is touched only when a tensor is asked
for, so the file's pages stay page cache and never count as the process's own memory.
Every tensor comes back as transformers' GGUF loader
(``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``, the path
``from_pretrained(gguf_file=...)`` takes) would hand it to the model, computed the same way:

* the config dict is rebuilt from the metadata with transformers' own tables
  (``GGUF_CONFIG_MAPPING``, ``GGUF_CONFIG_DEFAULTS_MAPPING``) and its special cases (the
  mistral rename, ``gemma3`` -> ``gemma3_text``, tied embeddings when there is no
  ``output.weight``, ``vocab_size`` from the vocabulary's length);
* names are transformers' (``get_gguf_hf_weights_map``, one call for the whole model);
* values are ``gguf.quants.dequantize`` of the raw rows, then transformers'
  ``TENSOR_PROCESSORS`` fix for the architecture (llama: the Q/K reverse permutation;
  gemma2/gemma3: norms stored as ``w + 1``). Rows are dequantized a chunk at a time into
  the result, so a large tensor costs its float32 size and not several copies of it
  (dequantization is per quant block, so the values are the same).

:meth:`GGUFTensors.embedding_rows` dequantizes only the rows of the given token ids.
Every dequantization is logged in :attr:`GGUFTensors.reads`, so a caller (or a test) can
prove which blocks were touched.

torch and transformers are imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from pyactadd import gguf_header
from pyactadd.errors import InputError

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
"""GGUF ``general.architecture`` values the PyTorch streaming path runs (llama includes Mistral-style files)."""

EMBEDDING = "token_embd.weight"
CHUNK_BYTES = 16 << 20
"""About how much float32 one dequantization step makes: large tensors are done in row chunks of this size."""

_BLOCK = re.compile(r"blk\.(0|[1-9][0-9]*)\.")


class UnsupportedModel(InputError):
    """The file is not one the PyTorch path reads: another architecture, an unreadable type, a cut-short file."""


def unsupported_architecture_message(name: str, architecture: object) -> str:
    """The one line for a file of another architecture: the supported ones and the option that works."""
    return (
        f"{name} is a {architecture!r} model; PyTorch extraction supports {', '.join(SUPPORTED_ARCHITECTURES)}: "
        "use --backend llama, which extracts inside llama.cpp for any architecture it runs"
    )


@dataclass(frozen=True)
class Read:
    """One dequantization: which tensor and how many of its rows (None: all of it)."""

    name: str
    rows: int | None

    @property
    def block_index(self) -> int | None:
        """The transformer block the tensor belongs to (``blk.N.``), or None for global tensors."""
        match = _BLOCK.match(self.name)
        return int(match[1]) if match else None


def read_model_header(path: str | os.PathLike[str], check_architecture=None) -> gguf_header.Header:
    """The checked header of a GGUF model (arrays skipped), one-line errors naming the file.

    A file cut short inside its tensor data is refused here (the header names every
    tensor's extent), before anything is computed.

    Raises:
        UnsupportedModel: not GGUF, malformed, cut short, or big-endian.
    """
    name = Path(path).name
    try:
        header = gguf_header.read_header(path, arrays=False, check_architecture=check_architecture)
    except gguf_header.MalformedGGUF as exc:
        raise UnsupportedModel(f"{name} is damaged or incomplete ({exc}): download it again") from None
    except gguf_header.GGUFHeaderError as exc:
        raise UnsupportedModel(f"{name}: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    if header.byte_order != "<":
        raise UnsupportedModel(f"{name} is a big-endian GGUF file: use --backend llama")
    return header


class GGUFTensors:
    """One GGUF model file, memory-mapped; see the module docstring.

    Use as a context manager, or call :meth:`close`. Tensors returned are new float32
    torch tensors (never views of the file), so they outlive the map.

    Raises (from the constructor):
        UnsupportedModel: not a GGUF file, a malformed or cut-short file, or an
            architecture outside :data:`SUPPORTED_ARCHITECTURES`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        header = read_model_header(self.path, check_architecture=self._check_architecture)
        self.metadata: dict[str, Any] = {key: item.value for key, item in header.metadata.items()}
        self.tensors = {info.name: info for info in header.tensors}
        self.architecture: str = self.metadata[gguf_header.ARCHITECTURE_KEY]
        self.config: dict[str, Any] = transformers_config_dict(self.metadata, list(self.tensors))
        self.reads: list[Read] = []
        self._handle = open(self.path, "rb")
        self._map: mmap.mmap | None = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._processor = None
        self._names: dict[str, str] | None = None

    def _check_architecture(self, architecture: str) -> None:
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(unsupported_architecture_message(self.path.name, architecture))

    @property
    def model_type(self) -> str:
        """transformers' model_type for the file (``llama``, ``mistral``, ``qwen2``, ``gemma3_text``, ...)."""
        return self.config["model_type"]

    @property
    def n_layer(self) -> int:
        """Number of transformer blocks."""
        return int(self.config["num_hidden_layers"])

    @property
    def n_embd(self) -> int:
        """Width of the residual stream."""
        return int(self.config["hidden_size"])

    def needed_tensors(self, deepest: int) -> list[gguf_header.TensorInfo]:
        """The tensors reading layer ``deepest`` touches: the embedding and blocks ``0 .. deepest - 1``."""
        needed = []
        for info in self.tensors.values():
            block = Read(info.name, None).block_index
            if info.name == EMBEDDING or (block is not None and block < deepest):
                needed.append(info)
        return needed

    def block_tensor_names(self, block: int) -> list[str]:
        """The GGUF names of block ``block``'s tensors, in file order."""
        prefix = f"blk.{block}."
        return [name for name in self.tensors if name.startswith(prefix)]

    def hf_names(self, hf_state_keys: Iterable[str]) -> dict[str, str]:
        """transformers' GGUF -> HF name map for a model whose ``state_dict`` has ``hf_state_keys``.

        Built once by transformers' ``get_gguf_hf_weights_map`` (gguf-py's tensor-name
        table for the architecture) and kept; later calls return it.
        """
        if self._names is None:
            from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

            self._names = get_gguf_hf_weights_map(
                _NameShell(list(hf_state_keys)), self._tensor_processor(), self.model_type, self.n_layer
            )
        return self._names

    def _tensor_processor(self):
        if self._processor is None:
            from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

            # Keyed by the file's own architecture, as load_gguf_checkpoint does (mistral files are "llama").
            self._processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.config)
        return self._processor

    def _raw_rows(self, name: str) -> tuple[np.ndarray, Any]:
        """The tensor's bytes as rows of raw quant blocks (GGUFReader's layout), a view of the map."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if self._map is None:
            raise ValueError(f"{self.path.name} is closed")
        info = self.tensors[name]
        kind = GGMLQuantizationType(info.ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[kind]
        shape = info.shape
        row_bytes = shape[-1] // block_size * type_size
        raw = np.frombuffer(self._map, dtype=np.uint8, count=math.prod(shape[:-1]) * row_bytes, offset=info.offset)
        return raw.reshape(*shape[:-1], row_bytes), kind

    def _dequantized(self, raw: np.ndarray, kind: Any, shape: tuple[int, ...]) -> np.ndarray:
        """``raw`` rows dequantized into a new float32 array of ``shape``, a chunk of rows at a time."""
        from gguf.quants import dequantize

        flat = raw.reshape(-1, raw.shape[-1])
        out = np.empty((flat.shape[0], shape[-1]), dtype=np.float32)
        step = max(1, CHUNK_BYTES // (4 * shape[-1]))
        into = _DEQUANTIZE_INTO.get(kind.name)
        for start in range(0, flat.shape[0], step):
            if into is not None:
                into(flat[start : start + step], out[start : start + step])
            else:
                out[start : start + step] = dequantize(flat[start : start + step], kind)
        return out.reshape(shape)

    def _finish(self, values: np.ndarray, name: str, rows: int | None) -> torch.Tensor:
        import torch

        self.reads.append(Read(name, rows))
        result = self._tensor_processor().process(weights=values, name=name).weights
        # A new contiguous float32 array (the processor may return a view), as transformers' np.copy gives.
        if result is not values or not result.flags.c_contiguous:
            result = np.ascontiguousarray(result, dtype=np.float32)
        return torch.from_numpy(result).to(torch.float32)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (a GGUF name) dequantized to float32, with transformers' fix for the architecture applied."""
        raw, kind = self._raw_rows(name)
        return self._finish(self._dequantized(raw, kind, self.tensors[name].shape), name, None)

    def embedding_rows(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Rows ``token_ids`` of the token embedding, ``[len(token_ids), n_embd]`` float32.

        Only those rows' quant blocks are read (each row of a row-major quantized matrix is
        whole blocks), so each row equals the same row of the whole dequantized matrix.

        Raises:
            InputError: a token id outside the vocabulary.
        """
        ids = np.asarray(list(token_ids), dtype=np.int64)
        n_vocab = self.tensors[EMBEDDING].shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
            bad = int(ids[(ids < 0) | (ids >= n_vocab)][0])
            raise InputError(f"token id {bad} is outside the vocabulary of {self.path.name} ({n_vocab} tokens)")
        raw, kind = self._raw_rows(EMBEDDING)
        shape = (len(ids), self.tensors[EMBEDDING].shape[-1])
        return self._finish(self._dequantized(raw[ids], kind, shape), EMBEDDING, len(ids))

    def blocks_read(self) -> list[int]:
        """The transformer blocks any tensor has been dequantized from, sorted."""
        return sorted({read.block_index for read in self.reads if read.block_index is not None})

    def close(self) -> None:
        """Unmap and close the file (tensors already returned stay valid)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive (an exception's frames): the map closes when it goes
            self._handle.close()
            self._map = None

    def __enter__(self) -> "GGUFTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _q8_0_into(raw: np.ndarray, out: np.ndarray) -> None:
    """Q8_0 rows dequantized into ``out`` without temporaries the size of ``out``.

    gguf-py computes ``int8 values * float16 scale``, both widened to float32 (exactly)
    and multiplied once; so does this, with the product written straight into ``out``.
    """
    blocks = raw.reshape(-1, 34)
    scale = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
    np.multiply(blocks[:, 2:].view(np.int8), scale, out=out.reshape(-1, 32), dtype=np.float32)


def _f16_into(raw: np.ndarray, out: np.ndarray) -> None:
    """F16 rows widened into ``out`` (exact, as gguf-py's ``astype(np.float32)``)."""
    np.copyto(out, raw.view(np.float16).reshape(out.shape), casting="safe")


# Types whose dequantization is exact widening and at most one float32 product, written
# straight into the result; every other type goes through gguf-py's (equal) arrays.
_DEQUANTIZE_INTO = {"Q8_0": _q8_0_into, "F16": _f16_into}


class _NameShell:
    """What ``get_gguf_hf_weights_map`` reads of a model: its state-dict keys, and no children to recurse into.

    (Given a real module it rebuilds gguf's name table once per submodule; one flat call
    gives the same map.)
    """

    def __init__(self, keys: list[str]) -> None:
        self._keys = keys

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._keys)

    def named_children(self) -> Iterable[tuple[str, Any]]:
        return iter(())


def transformers_config_dict(metadata: dict[str, Any], tensor_names: Sequence[str]) -> dict[str, Any]:
    """The config dict ``load_gguf_checkpoint(path)["config"]`` returns, from already-read metadata.

    transformers' steps, in its order, with its tables. Metadata arrays are not read (only
    their length), so a config key whose value is an array is refused; no architecture
    of :data:`SUPPORTED_ARCHITECTURES` has one.

    Raises:
        UnsupportedModel: a config key whose value is an array.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING

    architecture = metadata[gguf_header.ARCHITECTURE_KEY]
    # transformers tests `"mistral" in read_field(...)`, a list: true only for the name "mistral" itself.
    updated = "mistral" if "llama" in architecture and metadata.get("general.name") == "mistral" else architecture
    config: dict[str, Any] = {"tie_word_embeddings": all(tensor != "output.weight" for tensor in tensor_names)}
    defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {})
    for key, value in defaults.items():
        config.setdefault(key, value)
    config.update(_mapped_config(metadata, architecture, updated))
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    tokens = metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, gguf_header.SkippedArray):
        config["vocab_size"] = tokens.count
    return config


def _mapped_config(metadata: dict[str, Any], architecture: str, updated: str) -> dict[str, Any]:
    """The metadata keys transformers' ``GGUF_CONFIG_MAPPING`` renames into config keys."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    config: dict[str, Any] = {}
    for gguf_key, value in metadata.items():
        gguf_key = gguf_key.replace(architecture, updated)
        prefix, _, config_key = gguf_key.partition(".")
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(config_key)
        if renamed is None or renamed == -1:
            continue
        if isinstance(value, gguf_header.SkippedArray):
            raise UnsupportedModel(f"metadata {gguf_key} is an array, which this reader does not take into a config")
        config[renamed] = value
    return config


def dequantizable_types() -> frozenset[int]:
    """ggml types ``gguf.quants.dequantize`` handles (F32, F16 and the block quantizations it implements)."""
    from gguf import GGMLQuantizationType
    from gguf import quants

    known = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    # gguf's registry of quantization classes: read it rather than a list that drifts with gguf.
    known.update(getattr(quants, "_type_traits", {}))
    return frozenset(int(kind) for kind in known)


def check_dequantizable(name: str, tensors: Iterable[gguf_header.TensorInfo]) -> None:
    """Refuse, before any compute, a file with a tensor type gguf-py cannot dequantize.

    Raises:
        UnsupportedModel: one line naming the tensor, its type and ``--backend llama``.
    """
    from gguf import GGMLQuantizationType

    readable = dequantizable_types()
    for info in tensors:
        if info.ggml_type not in readable:
            kind = GGMLQuantizationType(info.ggml_type).name  # the header reader admits only known types
            raise UnsupportedModel(
                f"{name}: tensor {info.name} is {kind}, which PyTorch extraction cannot dequantize: "
                "use --backend llama (llama.cpp reads its own types)"
            )
