"""Perplexity and next-token log-probabilities of many short texts at once, inside llama.cpp.

The ActAdd paper measures steering by perplexity: a document is split into sentences and
each sentence is scored on its own. Scoring 100+ sentences per setting one
``llama_decode`` at a time would dominate a layer x coefficient sweep, so
:class:`BatchScorer` packs many sentences into ONE ``llama_decode`` as separate sequences
(sequence ``i`` at positions ``0 .. len_i - 1``, logits requested for every token that
predicts another), in a context created with ``n_seq_max`` sequences and a unified KV
cache. The KV cache is cleared between decodes, so every sentence starts from nothing.

Steering goes through the same engine as ``pyactadd run`` (:class:`pyactadd.runtime.steering.Steering`).
The engine matches rows by position only, across sequences, which is exactly right here:
every sentence starts at position 0, so row ``p`` lands on position ``p`` of every sentence.

What is scored (the same rule steered and unsteered): a sentence becomes
``prefix + tokens``, where the prefix is the anchor token when one is given (the steering
vector's ``anchor_id``), else the BOS that the model adds by itself, else nothing. Every
token after the first one of that sequence is a prediction target: with a prefix, all of
the sentence's tokens (the first one predicted from the prefix); without one, the
sentence's tokens 1..n-1 (nothing predicts token 0). The prefix itself is never a target.

Perplexity of a set is ``exp(total NLL / number of target tokens)`` (token-weighted, the
usual corpus perplexity); the mean of per-sentence perplexities is reported beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pyactadd.errors import EngineError, InputError
from pyactadd.files import atomic_write, remove_stale_temps, sigint_held
from pyactadd.native import default_threads, llama_cpp_module
from pyactadd.runtime.logits import logsumexp_rows
from pyactadd.runtime.steering import CLOSED

DEFAULT_N_CTX = 1024
"""KV cache size and the most tokens one ``llama_decode`` takes: the longest sentence that can be scored."""

DEFAULT_BATCH_TOKENS = 256
"""Tokens packed into one ``llama_decode``. Every token of a decode attends (masked) to every
KV cell the decode uses, so larger decodes waste attention work (docs/performance.md)."""

F32_COPY_MAX_FILE_BYTES = 512 * 1024 * 1024
"""``compute="auto"`` expands a quantized model to float32 only up to this file size (about 4 GB as float32)."""

_UNQUANTIZED_FILE_TYPES = frozenset({0, 1, 32})  # general.file_type: all F32, mostly F16, mostly BF16

@dataclass(frozen=True)
class Perplexity:
    """Perplexity of a set of sentences, and what it was computed from."""

    ppl: float  # exp(total NLL / n_tokens)
    mean_sentence_ppl: float  # mean over sentences of exp(sentence NLL / sentence tokens)
    nll: float  # total negative log-likelihood, nats
    n_tokens: int  # scored (target) tokens
    n_sentences: int

    @staticmethod
    def of(nlls: Sequence[np.ndarray]) -> "Perplexity":
        """Combine per-sentence arrays of per-token NLLs (sentences without a target are skipped)."""
        scored = [np.asarray(n, dtype=np.float64) for n in nlls if len(n)]
        if not scored:
            raise InputError("no token to score: every sentence is a single token without a prefix")
        total = float(sum(n.sum() for n in scored))
        n_tokens = int(sum(len(n) for n in scored))
        return Perplexity(
            ppl=math.exp(total / n_tokens),
            mean_sentence_ppl=float(np.mean([math.exp(n.mean()) for n in scored])),
            nll=total,
            n_tokens=n_tokens,
            n_sentences=len(scored),
        )

    def as_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "mean_sentence_ppl": self.mean_sentence_ppl,
            "nll": self.nll,
            "n_tokens": self.n_tokens,
            "n_sentences": self.n_sentences,
        }


def float32_copy(model_path: str | os.PathLike[str]) -> Path:
    """A float32 GGUF of the same weights as ``model_path`` (dequantized by llama.cpp), cached.

    Dequantizing is exact (each weight becomes the float32 value the quantized block
    stands for); what changes is the arithmetic: llama.cpp multiplies quantized weights
    with activations quantized to 8 bits, float32 weights with float32 activations. The
    float32 copy scores faster on a CPU and its perplexities differ slightly from the
    quantized file's (the 8-bit activation rounding); steered/unsteered ratios move far
    less (docs/performance.md has the numbers).

    The copy lives in ``<cache>/gguf-f32/`` (see :func:`pyactadd.extract.torch_model.cache_root`),
    keyed by the model's path, size and modification time. Half-written copies left there
    by a killed run are removed first (only those whose process is gone). Ctrl-C during
    the conversion takes effect when llama.cpp returns (it cannot stop mid-way).

    Raises:
        InputError: llama.cpp cannot read or convert the model.
    """
    import hashlib

    from pyactadd.extract.torch_model import cache_root

    lc = llama_cpp_module()
    path = Path(model_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf-f32" / f"{path.stem}-{key}-f32.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    if target.is_file():
        return target
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = default_threads()
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp logs every tensor it converts

    def expand(temp: Path) -> None:
        with sigint_held():
            rc = lc.llama_model_quantize(str(path).encode(), str(temp).encode(), params)
        if rc != 0:
            raise InputError(f"llama.cpp could not expand {path.name} to float32 (code {rc}): use compute='model'")

    atomic_write(target, expand, error=InputError)
    return target


def is_quantized(model_path: str | os.PathLike[str]) -> bool:
    """Whether a GGUF model stores quantized weights (its ``general.file_type`` is not F32/F16/BF16)."""
    from pyactadd.prompts.tokens import Tokenizer

    metadata = getattr(Tokenizer.from_model(model_path), "metadata", {})
    try:
        file_type = int(metadata.get("general.file_type", 0))
    except ValueError:
        return False
    return file_type not in _UNQUANTIZED_FILE_TYPES


def scoring_model(model_path: str | os.PathLike[str], compute: str = "auto") -> Path:
    """The GGUF file to score with: ``model`` (the file as is), ``f32`` (:func:`float32_copy`) or
    ``auto`` (the float32 copy for a quantized model whose file is at most 512 MB).

    Raises:
        InputError: an unknown ``compute`` value.
    """
    if compute not in ("auto", "f32", "model"):
        raise InputError(f"compute must be auto, f32 or model, got {compute!r}")
    path = Path(model_path)
    if compute == "model":
        return path
    if compute == "auto" and (not is_quantized(path) or path.stat().st_size > F32_COPY_MAX_FILE_BYTES):
        return path
    return float32_copy(path)


class Plan:
    """Sequences packed into prepared ``llama_batch``es, reusable for any steering.

    Sequence ``i`` occupies positions ``0 .. len_i - 1`` under seq_id ``k`` (its slot in
    its batch); logits are requested at ``outputs[i]``. Build with :meth:`BatchScorer.plan`.
    """

    def __init__(self, batches: list["_Batch"], n_sequences: int) -> None:
        self.batches = batches
        self.n_sequences = n_sequences
        self.n_tokens = sum(b.n_tokens for b in batches)
        self._finalizer = weakref.finalize(self, _free_batches, [b.raw for b in batches])

    def close(self) -> None:
        """Free the llama.cpp batches now (also done when the plan is garbage-collected)."""
        self._finalizer()


@dataclass
class _Batch:
    raw: object  # llama_cpp.llama_batch
    n_tokens: int
    n_outputs: int
    members: list[tuple[int, np.ndarray]]  # (sequence index, its output rows in the logits, in position order)


class _PrefixTree:
    """The tokens of one decode: each distinct prefix once, a member of every sequence that starts with it."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.members: list[list[int]] = []  # the sequence slots of each row
        self._children: dict[tuple[int, int], int] = {}  # (parent row or -1, token) -> row

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def new_tokens(self, ids: Sequence[int], n: int) -> int:
        """How many of the first ``n`` tokens of ``ids`` are not in the tree yet."""
        row = -1
        for p in range(n):
            row = self._children.get((row, int(ids[p])), None)
            if row is None:
                return n - p
        return 0

    def add(self, slot: int, ids: Sequence[int], n: int) -> list[int]:
        """Put the first ``n`` tokens of ``ids`` in the tree as sequence ``slot``; the row of each position."""
        path, row = [], -1
        for p in range(n):
            key = (row, int(ids[p]))
            row = self._children.get(key, -1)
            if row < 0:
                row = len(self.tokens)
                self._children[key] = row
                self.tokens.append(key[1])
                self.positions.append(p)
                self.members.append([])
            self.members[row].append(slot)
            path.append(row)
        return path


def _prefix_batch(tree: _PrefixTree, members: list[tuple[int, list[int]]], wanted: list[list[int]]) -> _Batch:
    """The ``llama_batch`` of one tree, with logits at each member's wanted positions."""
    lc = llama_cpp_module()
    n_tokens = tree.n_tokens
    raw = lc.llama_batch_init(n_tokens, 0, max(len(m) for m in tree.members))
    try:
        np.ctypeslib.as_array(raw.token, shape=(n_tokens,))[:] = tree.tokens
        np.ctypeslib.as_array(raw.pos, shape=(n_tokens,))[:] = tree.positions
        np.ctypeslib.as_array(raw.n_seq_id, shape=(n_tokens,))[:] = [len(m) for m in tree.members]
        for row, slots in enumerate(tree.members):
            for k, slot in enumerate(slots):
                raw.seq_id[row][k] = slot
        wanted_rows = [(index, np.asarray([path[p] for p in wanted[index]], dtype=np.int64)) for index, path in members]
        flags = np.zeros(n_tokens, dtype=np.int8)
        for _, at in wanted_rows:
            flags[at] = 1
        np.ctypeslib.as_array(raw.logits, shape=(n_tokens,))[:] = flags
        output_row = np.cumsum(flags, dtype=np.int64) - 1
        rows = [(index, output_row[at]) for index, at in wanted_rows]
        raw.n_tokens = n_tokens
        return _Batch(raw=raw, n_tokens=n_tokens, n_outputs=int(flags.sum()), members=rows)
    except BaseException:
        lc.llama_batch_free(raw)
        raise


def _free_batches(raws: list) -> None:
    lc = llama_cpp_module()
    for raw in raws:
        lc.llama_batch_free(raw)
    raws.clear()


def _load_llama(path: Path, n_ctx: int, threads: int):
    """A ``llama_cpp.Llama`` of ``path`` whose own context is a placeholder (see :func:`_multi_sequence_params`)."""
    try:
        # A small n_batch here: the Llama allocates n_batch x n_vocab floats of scores
        # that BatchScorer never uses. The context that matters is made by Steering.
        return llama_cpp_module().Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 64),
            n_ubatch=min(n_ctx, 64),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"llama.cpp cannot load {path}: {exc}; is it a GGUF model file?") from None


def _multi_sequence_params(llama, n_ctx: int, max_sequences: int, batch_tokens: int):
    """Put the multi-sequence settings into ``llama.context_params`` and return them.

    Steering re-creates the Llama's context from ``llama.context_params`` with the engine
    as cb_eval, so these settings must be in place before ``Steering.of``.
    """
    lc = llama_cpp_module()
    params = llama.context_params
    params.n_batch = n_ctx
    params.n_ubatch = min(n_ctx, max(batch_tokens, 64))
    params.n_seq_max = max(1, min(int(max_sequences), int(lc.llama_max_parallel_sequences())))
    params.kv_unified = True  # one KV buffer: any mix of sequence lengths fits n_ctx
    # No flash attention (llama-cpp-python's default too): on the quantized default model it
    # moves single tokens' NLL noticeably against the default path.
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return params


class BatchScorer:
    """A llama.cpp context for scoring many sequences per ``llama_decode``, with a steering engine.

    Args:
        model_path: GGUF model file (``None``: the default model).
        n_ctx: KV cache size: the longest sequence that can be scored.
        n_threads: CPU threads (default: all cores, at most 8).
        max_sequences: sequences per decode (capped by ``llama_max_parallel_sequences()``);
            1 decodes every sequence on its own, bit-identical to llama-cpp-python's own
            ``Llama.eval`` of that sequence.
        batch_tokens: tokens packed per decode (a longer sequence gets a decode of its own).

    ``self.steering`` is the :class:`~pyactadd.runtime.steering.Steering` of the underlying Llama:
    ``set`` and ``clear`` it between calls to :meth:`run`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        max_sequences: int = 256,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        from pyactadd.default_model import resolve_model
        from pyactadd.runtime.steering import Steering

        lc = llama_cpp_module()
        path = resolve_model(model_path)
        if not path.is_file():
            raise InputError(f"{path} is not a GGUF file (llama.cpp runs GGUF models)")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16:
            raise InputError(f"n_ctx must be an integer of at least 16, got {n_ctx!r}")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise InputError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
        llama = _load_llama(path, n_ctx, n_threads or default_threads())
        params = _multi_sequence_params(llama, n_ctx, max_sequences, batch_tokens)
        self.llama = llama
        self.steering = Steering.of(llama)
        self.model_path = path
        self.n_ctx = n_ctx
        self.batch_tokens = min(batch_tokens, n_ctx)
        self.n_seq_max = int(params.n_seq_max)
        self.n_vocab = int(llama.n_vocab())
        self.adds_bos = bool(lc.llama_vocab_get_add_bos(lc.llama_model_get_vocab(llama.model)))
        self.bos_id = int(llama.token_bos())
        self.n_decodes = 0  # llama_decode calls made, for benchmarks
        self.decode_seconds = 0.0  # time spent inside llama_decode
        self.on_batch: Callable[[int], None] | None = None  # called with each decoded batch's sequence count

    @property
    def fingerprint(self):
        """The loaded model's :class:`~pyactadd.vector.value.ModelFingerprint`."""
        return self.steering.fingerprint

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, anchor_id: int | None = None, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` as scored: the model's own BOS if it adds one, then the anchor if given.

        Special-token text (``<|im_start|>``) is parsed as the special token, as in ``pyactadd run``.
        """
        from pyactadd.prompts.tokens import apply_anchor

        if not text:
            raise InputError("empty text: give a non-empty sentence")
        ids = self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        return apply_anchor(ids, anchor_id)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens included as text (invalid UTF-8 replaced)."""
        return self.llama.detokenize([int(t) for t in ids], special=True).decode("utf-8", errors="replace")

    def sentence_ids(self, sentences: Sequence[str], *, anchor_id: int | None, source: str = "text") -> list[list[int]]:
        """Tokenize sentences for scoring and check that each fits the context.

        Raises:
            InputError: a sentence is longer than the context, naming its line.
        """
        out = []
        for number, sentence in enumerate(sentences, start=1):
            ids = self.tokenize(sentence, anchor_id=anchor_id)
            if len(ids) > self.n_ctx:
                raise InputError(
                    f"sentence {number} of {source} is {len(ids)} tokens, longer than the context of {self.n_ctx}: "
                    "split it into shorter sentences or raise --n-ctx"
                )
            out.append(ids)
        return out

    # ------------------------------------------------------------------ batches

    def plan(self, sequences: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]] | None = None) -> Plan:
        """Pack ``sequences`` into as few decodes as fit (in order), with logits at ``outputs[i]``.

        ``outputs`` defaults to every position that predicts a token of the sequence. Two
        savings, both exact (nothing that is read changes):

        * with the default outputs the last token is not decoded: nothing reads its logits
          or its KV cell;
        * a prefix that several sequences of a decode start with (the anchor, an opening
          scored with several completions) is decoded once, as a member of all their
          sequences (llama.cpp's shared KV cells), and its logits rows serve all of them.
          Sequences are packed in order, so give those that share a prefix together.
        """
        if outputs is None:
            lengths = [len(ids) - 1 for ids in sequences]
            outputs = [range(n) for n in lengths]
        else:
            lengths = [len(ids) for ids in sequences]
        if len(outputs) != len(sequences):
            raise InputError("plan needs one list of output positions per sequence")
        wanted: list[list[int]] = []
        for index, ids in enumerate(sequences):
            if len(ids) == 0:
                raise InputError(f"sequence {index} is empty")
            if len(ids) > self.n_ctx:
                raise InputError(f"sequence {index} is {len(ids)} tokens, longer than the context of {self.n_ctx}: raise n_ctx")
            positions = sorted({int(p) for p in outputs[index]})
            if positions and not 0 <= positions[0] <= positions[-1] < lengths[index]:
                raise InputError(f"output positions of sequence {index} are outside 0..{lengths[index] - 1}")
            wanted.append(positions)
        groups: list[tuple[_PrefixTree, list[tuple[int, list[int]]]]] = []
        for index in range(len(sequences)):
            n, ids = lengths[index], sequences[index]
            if n == 0:
                continue  # a lone token predicts nothing
            tree = groups[-1][0] if groups else None
            if tree is None or len(groups[-1][1]) >= self.n_seq_max or tree.n_tokens + tree.new_tokens(ids, n) > self.batch_tokens:
                tree = _PrefixTree()
                groups.append((tree, []))
            groups[-1][1].append((index, tree.add(len(groups[-1][1]), ids, n)))
        batches = []
        try:
            for tree, members in groups:
                batches.append(_prefix_batch(tree, members, wanted))
        except BaseException:
            _free_batches([b.raw for b in batches])
            raise
        return Plan(batches, len(sequences))

    def run(self, plan: Plan) -> Iterator[tuple[_Batch, np.ndarray]]:
        """Decode each batch of ``plan`` under the steering in force; yield it with its logits.

        The logits array ``[n_outputs, n_vocab]`` (float32, in batch order) is a view of
        llama.cpp's buffer, valid only until the next batch is decoded: use it before
        asking for the next one.

        The whole run holds the Llama as a generation does (its :class:`~pyactadd.runtime.steering.LlamaGuard`):
        a ``close()`` from another thread takes effect at the next batch, with EngineError,
        and frees the context only once the run has stopped; a steering change during the
        run is refused.

        Raises:
            EngineError: llama.cpp or the steering engine failed, or the Llama is closed
                (before or during the run).
        """
        import time

        lc = llama_cpp_module()
        with self.steering.guard.using("eval"):
            ctx = self.llama.ctx
            memory = lc.llama_get_memory(ctx)
            self.steering.reset_stats()
            for batch in plan.batches:
                if self.steering.closed:
                    raise EngineError(f"{CLOSED} (it was closed while scoring)")
                lc.llama_memory_clear(memory, True)
                start = time.perf_counter()
                rc = lc.llama_decode(ctx, batch.raw)
                self.decode_seconds += time.perf_counter() - start
                self.n_decodes += 1
                if rc != 0:
                    lc.llama_memory_clear(memory, True)
                    raise EngineError(f"llama_decode failed with code {rc} on a batch of {batch.n_tokens} tokens")
                self.steering.check_errors()
                pointer = lc.llama_get_logits(ctx)
                logits = np.ctypeslib.as_array(pointer, shape=(batch.n_outputs, self.n_vocab)) if batch.n_outputs else None
                yield batch, logits
                if self.on_batch is not None:
                    self.on_batch(len(batch.members))
            lc.llama_memory_clear(memory, True)

    # ------------------------------------------------------------------ scores

    def token_nlls(self, plan: Plan, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-sequence NLL (nats, float64) of tokens ``1..n-1`` of each sequence.

        ``plan`` must be :meth:`plan` of ``sequences`` with the default outputs.
        """
        result: list[np.ndarray] = [np.empty(0)] * plan.n_sequences
        for batch, logits in self.run(plan):
            if logits is None:
                continue
            lse = logsumexp_rows(logits)
            for index, rows in batch.members:
                targets = np.asarray(sequences[index][1 : len(rows) + 1], dtype=np.int64)
                if len(targets) != len(sequences[index]) - 1:
                    raise InputError("token_nlls needs a plan with the default output positions")
                result[index] = lse[rows] - logits[rows, targets].astype(np.float64)
        return result

    def perplexity(self, plan: Plan, sequences: Sequence[Sequence[int]]) -> Perplexity:
        """Perplexity of ``sequences`` (see the module docstring for what is scored)."""
        return Perplexity.of(self.token_nlls(plan, sequences))

    def output_logprobs(self, plan: Plan) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """For each sequence: ``(index, logits rows [n_outputs, n_vocab], log-sum-exp per row)``.

        The rows are views valid until the next item is asked for.
        """
        for batch, logits in self.run(plan):
            if logits is None:
                continue
            lse = logsumexp_rows(logits)
            for index, rows in batch.members:
                yield index, logits[rows], lse[rows]

    def last_logprobs(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Log-probabilities ``[n_sequences, n_vocab]`` (float64) of the token after each sequence."""
        plan = self.plan(sequences, [[len(ids) - 1] for ids in sequences])
        try:
            out = np.empty((len(sequences), self.n_vocab), dtype=np.float64)
            for index, rows, lse in self.output_logprobs(plan):
                out[index] = rows[0].astype(np.float64) - lse[0]
            return out
        finally:
            plan.close()

    def greedy(self, sequences: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
        """The ``n_tokens`` most likely next tokens after each sequence, greedily (steering in force)."""
        grown = [list(ids) for ids in sequences]
        for _ in range(n_tokens):
            logprobs = self.last_logprobs(grown)
            for ids, row in zip(grown, logprobs):
                ids.append(int(np.argmax(row)))
        return [ids[len(start):] for ids, start in zip(grown, sequences)]

    def close(self) -> None:
        """Free the llama.cpp context and model now."""
        with contextlib.suppress(Exception):
            self.steering.clear()
        self.llama.close()
