"""Tokenizing prompts exactly as llama.cpp will at inference, plus anchors and model fingerprints.

Extraction and the llama.cpp run stage must agree on every token id, or the steering rows
land on the wrong positions. So a GGUF model is always tokenized by llama.cpp itself
(the GGUF loaded vocab-only, without weights), with the same flags
llama-cpp-python uses for a completion: ``add_bos=True`` (which adds BOS only when the
model's vocab asks for it) and ``special=True`` (text such as ``<|im_start|>`` becomes
the special token). A Hugging Face directory uses ``transformers.AutoTokenizer`` with
``add_special_tokens=True``.

This module must not import torch: the run stage uses it too.
"""

from __future__ import annotations

import abc
import functools
import json
import os
from pathlib import Path
from typing import Sequence

from pyactadd.errors import InputError
from pyactadd.native import llama_cpp_module
from pyactadd.vector.value import ModelFingerprint

ANCHOR_NONE = "none"
ANCHOR_BOS = "bos"

# transformers model_type -> the architecture name llama.cpp gives the converted GGUF.
_HF_TO_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "qwen2": "qwen2",
}


class Tokenizer(abc.ABC):
    """A model's tokenizer, as the inference stage will use it.

    Build one with :meth:`from_model`; instances are cached per model file and shared.
    """

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path

    @staticmethod
    def from_model(model_path: str | os.PathLike[str]) -> Tokenizer:
        """Return the (cached) tokenizer of a GGUF file or a Hugging Face model directory.

        Raises:
            InputError: the path is missing or cannot be read as a model.
        """
        path = Path(model_path).resolve()
        try:
            stat = path.stat()
        except OSError:
            raise InputError(f"no such model file: {model_path}") from None
        # The stat fields make a replaced file (same name, new contents) load afresh.
        return _cached_tokenizer(str(path), stat.st_size, stat.st_mtime_ns)

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """The model's BOS token id, or ``None`` when the model has none."""

    @property
    @abc.abstractmethod
    def adds_bos(self) -> bool:
        """Whether :meth:`encode` with ``add_special=True`` puts BOS first."""

    @property
    @abc.abstractmethod
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""

    @abc.abstractmethod
    def _encode(self, text: str, add_special: bool) -> list[int]:
        """Tokenize non-empty ``text``; special-token text always parses as the special token."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Turn token ids back into text (special tokens included as text)."""

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize ``text`` the way the inference stage does.

        ``add_special=True`` adds BOS (and whatever else) only where the model asks for it;
        special-token text such as ``<|im_start|>`` is always parsed as the special token.

        Raises:
            InputError: ``text`` is empty, not a string, or not encodable as UTF-8.
        """
        if not isinstance(text, str):
            raise InputError(f"prompt must be text, got {type(text).__name__}")
        if not text:
            raise InputError("empty prompt: give a non-empty text")
        check_utf8(text, "the prompt")
        return self._encode(text, add_special)

    def single_token(self, text: str, what: str, *, example: str = "' '") -> int:
        """Return the id of ``text`` if it is exactly one token (no BOS added).

        ``what`` names the setting in the error message (e.g. ``"pad"``) and ``example``
        is the suggestion shown there.

        Raises:
            InputError: ``text`` is empty or tokenizes to more or fewer than one token.
        """
        if not isinstance(text, str):
            raise InputError(f"{what} must be text, got {type(text).__name__}")
        check_utf8(text, f"the {what} text")
        ids = self._encode(text, False) if text else []
        if len(ids) != 1:
            shown = ", ".join(repr(self.decode([i])) for i in ids[:8]) + (", …" if len(ids) > 8 else "")
            pieces = f" ({shown})" if ids else ""
            raise InputError(
                f"{what} text {text!r} is {len(ids)} tokens{pieces}; pick a single-token {what} such as {example}"
            )
        return ids[0]


def check_utf8(text: str, what: str) -> None:
    """Raise InputError if ``text`` cannot be encoded as UTF-8, naming ``what`` it is.

    A command-line argument that is not UTF-8 reaches Python as lone surrogates
    (``"\\udcff"``), as ``"\\ud800"`` in JSON does; llama.cpp's tokenizers take UTF-8 bytes.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # how Python decodes a byte that is not UTF-8 (surrogateescape)
            raise InputError(
                f"{what} is not UTF-8: byte 0x{code - 0xDC00:02x} (character {exc.start}) cannot be decoded; "
                "pass UTF-8 text (set a UTF-8 locale, e.g. LANG=C.UTF-8)"
            ) from None
        raise InputError(
            f"{what} is not valid Unicode text: character {exc.start} is a lone surrogate (U+{code:04X}); send UTF-8 text"
        ) from None


class _GGUFTokenizer(Tokenizer):
    """llama.cpp's own tokenizer, from the GGUF loaded vocab-only (no weights).

    This holds llama-cpp-python's ``LlamaModel`` rather than a whole ``Llama``: the
    ``Llama`` constructor also creates a context, which for a vocab-only model prints a
    spurious "n_ctx_train (0)" warning to stderr. ``Llama.tokenize`` calls this very
    ``LlamaModel.tokenize``, so the ids are the same.
    """

    def __init__(self, model_path: Path) -> None:
        super().__init__(model_path)
        llama_cpp = llama_cpp_module()
        from llama_cpp._internals import LlamaModel

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self.vocab = LlamaModel(path_model=str(model_path), params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"llama.cpp cannot read the vocabulary of {model_path}: {exc}") from None
        self.metadata: dict[str, str] = self.vocab.metadata()

    @property
    def bos_id(self) -> int | None:
        bos = int(self.vocab.token_bos())
        return bos if bos >= 0 else None

    @property
    def adds_bos(self) -> bool:
        return bool(self.vocab.add_bos_token()) and self.bos_id is not None

    @property
    def n_vocab(self) -> int:
        return int(self.vocab.n_vocab())

    def _encode(self, text: str, add_special: bool) -> list[int]:
        return [int(i) for i in self.vocab.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocab.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def fingerprint(self) -> ModelFingerprint:
        """Architecture and sizes from the GGUF metadata.

        A vocab-only load leaves llama.cpp's hyperparameters at zero (``llama_model_n_embd``
        returns 0), so the sizes come from the ``<arch>.embedding_length`` and
        ``<arch>.block_count`` keys that llama.cpp itself reads when loading weights.
        """
        arch = self.metadata.get("general.architecture") or None
        sizes = {}
        for name, key in (("n_embd", "embedding_length"), ("n_layer", "block_count")):
            value = self.metadata.get(f"{arch}.{key}")
            try:
                sizes[name] = int(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InputError(
                    f"{self.model_path.name} has no usable {arch}.{key} in its GGUF metadata: is it a language model?"
                ) from None
        return ModelFingerprint(architecture=arch, n_embd=sizes["n_embd"], n_layer=sizes["n_layer"], n_vocab=self.n_vocab)


class _HFTokenizer(Tokenizer):
    """``transformers.AutoTokenizer`` for a Hugging Face model directory."""

    def __init__(self, model_path: Path) -> None:
        super().__init__(model_path)
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_path))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the tokenizer of {model_path}: {exc}") from None

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def adds_bos(self) -> bool:
        bos = self.bos_id
        return bos is not None and self.hf.encode("a", add_special_tokens=True)[:1] == [bos]

    @property
    def n_vocab(self) -> int:
        return len(self.hf)

    def _encode(self, text: str, add_special: bool) -> list[int]:
        return [int(i) for i in self.hf.encode(text, add_special_tokens=add_special)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str, size: int, mtime_ns: int) -> Tokenizer:
    model_path = Path(path)
    if model_path.is_dir():
        return _HFTokenizer(model_path)
    return _GGUFTokenizer(model_path)


def resolve_anchor(tokenizer: Tokenizer, anchor: str) -> int | None:
    """Turn an anchor setting into a token id, or ``None`` for no anchor.

    ``"none"`` means no anchor, ``"bos"`` the model's BOS token, and any other text must
    be exactly one (special) token, e.g. ``"<|im_start|>"``.

    Raises:
        InputError: the model has no BOS token, or the text is not a single token.
    """
    if not isinstance(anchor, str):
        raise InputError(f"anchor must be 'none', 'bos' or a token's text, got {anchor!r}")
    keyword = anchor.strip().lower()
    if keyword == ANCHOR_NONE:
        return None
    if keyword == ANCHOR_BOS:
        bos = tokenizer.bos_id
        if bos is None:
            raise InputError("this model has no BOS token: use --anchor none or a single-token text")
        return bos
    example = repr(tokenizer.decode([tokenizer.bos_id])) if tokenizer.bos_id is not None else "'bos'"
    return tokenizer.single_token(anchor, "anchor", example=f"{example}, 'bos' or 'none'")


def apply_anchor(ids: Sequence[int], anchor_id: int | None) -> list[int]:
    """Prepend ``anchor_id`` to ``ids`` unless there is no anchor or ``ids`` already starts with it."""
    ids = list(ids)
    if anchor_id is None or ids[:1] == [anchor_id]:
        return ids
    return [anchor_id, *ids]


def fingerprint_of(model_path: str | os.PathLike[str]) -> ModelFingerprint:
    """Read a model's fingerprint (architecture as GGUF names it, n_embd, n_layer, n_vocab).

    A GGUF file is read through llama.cpp's vocab-only loader; a Hugging Face directory
    through its ``config.json``, with ``model_type`` mapped to llama.cpp's architecture name.

    Raises:
        InputError: the model cannot be read or its config lacks the sizes.
    """
    path = Path(model_path)
    if not path.is_dir():
        tokenizer = Tokenizer.from_model(path)
        assert isinstance(tokenizer, _GGUFTokenizer)
        return tokenizer.fingerprint()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path / 'config.json'}: {exc}") from None
    model_type = config.get("model_type")
    # Multimodal configs (e.g. gemma3) keep the language model's sizes in text_config.
    sizes = config.get("text_config") or config
    try:
        n_embd = int(sizes["hidden_size"])
        n_layer = int(sizes["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise InputError(
            f"{path / 'config.json'} has no hidden_size/num_hidden_layers: is this a causal language model?"
        ) from None
    n_vocab = sizes.get("vocab_size", config.get("vocab_size"))
    return ModelFingerprint(
        architecture=_HF_TO_GGUF_ARCH.get(model_type, model_type) if model_type else None,
        n_embd=n_embd,
        n_layer=n_layer,
        n_vocab=int(n_vocab) if n_vocab is not None else None,
    )
