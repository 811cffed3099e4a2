"""Steering a ``llama_cpp.Llama``: attach the C++ engine and set what it adds.

This is the only module that touches llama-cpp-python's internals (its context object),
which is why llama-cpp-python is pinned: the engine must be installed as the context's
eval callback, and llama.cpp only reads that callback when a context is created, so
attaching re-creates the Llama's context with the callback in its parameters.

Alignment of a vector's rows [P, n_embd] with the sequence:

* ``front``: row p at absolute position p (the paper's method).
* an integer ``k``: row p at position p + k.
* ``back``: the last row at the last prompt token (needs the prompt length).
* ``all``: a 1-D vector (P = 1) at every position, prompt and generated, through
  llama.cpp's own control-vector mechanism (``llama_set_adapter_cvec``), so it costs no
  callback work; block input 1 (which llama.cpp's control vectors cannot reach) goes
  through the engine instead.

Each vector takes its own alignment (the one given with it, else the file's), so one
:meth:`Steering.set` can mix them; ``align=`` overrides them all.

Misuse never reaches C: attaching puts a :class:`LlamaGuard` in front of the Llama's
public methods, so a call after ``close()`` raises EngineError instead of touching a freed
context, ``close()`` during a generation on another thread frees the model only once that
generation has stopped (at its next decode, with EngineError), and a steering change
while a generation runs is refused with EngineError rather than racing llama_decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import numbers
import threading
from collections.abc import Iterator as AnyIterator
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from pyactadd.errors import EngineError, InputError
from pyactadd.vector.layers import to_llama_index
from pyactadd.native import engine_module, llama_cpp_module
from pyactadd.vector.value import ModelFingerprint, SteeringVector, check_coefficient, scaled_rows

Alignment = Union[str, int]
ALIGNMENTS = ("front", "back", "all")

# One vector to add: (vector, coeff), or (vector, coeff, align) where align (None: the
# vector's own) places this vector's rows independently of the others.
SteerItem = Union[Tuple[SteeringVector, float], Tuple[SteeringVector, float, Optional[Alignment]]]


def check_type(value: Any, kinds: type | tuple[type, ...], param: str, what: str) -> None:
    """Raise InputError naming ``param`` unless ``value`` is an instance of ``kinds``.

    A bool is not accepted as a number (``True`` is an int to Python, never to a caller).
    """
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))):
        raise InputError(f"{param} must be {what}, got {type(value).__name__} {_shown(value)}")


def check_count(value: Any, param: str, minimum: int = 0) -> int:
    """``value`` as an int of at least ``minimum``, else InputError naming ``param``."""
    check_type(value, numbers.Integral, param, "an integer")
    if value < minimum:
        raise InputError(f"{param} must be at least {minimum}, got {value}")
    return int(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_alignment(value: str | int) -> Alignment:
    """Turn ``front``, ``back``, ``all`` or an integer offset (as text or int) into an alignment."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise InputError(f"unknown alignment {_shown(value)}: use front, back, all or a non-negative position offset")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if value < 0:
            raise InputError(f"alignment offset must be >= 0, got {value}")
        return value
    text = str(value).strip().lower()
    if text in ALIGNMENTS:
        return text
    try:
        return parse_alignment(int(text))
    except ValueError:
        raise InputError(f"unknown alignment {value!r}: use front, back, all or a non-negative position offset") from None


def steer_items(vectors: SteeringVector | Sequence[SteerItem]) -> list[tuple[SteeringVector, float, Alignment | None]]:
    """``vectors`` as ``(vector, coeff, align)`` triples: a lone vector has coefficient 1, and
    an item without an alignment gets None (the vector's own)."""
    if isinstance(vectors, SteeringVector):
        vectors = [(vectors, 1.0)]
    check_type(vectors, (list, tuple), "vectors", "a SteeringVector or a list of (vector, coeff[, align]) items")
    items = []
    for index, item in enumerate(vectors):
        check_type(item, (list, tuple), f"vectors[{index}]", "a (vector, coeff) or (vector, coeff, align) tuple")
        if len(item) not in (2, 3):
            raise InputError(f"vectors[{index}]: a steering item is (vector, coeff) or (vector, coeff, align), got {len(item)} values")
        check_type(item[0], SteeringVector, f"vectors[{index}][0]", "a SteeringVector")
        check_type(item[1], numbers.Real, f"vectors[{index}][1] (the coefficient)", "a number")
        own = parse_alignment(item[2]) if len(item) == 3 and item[2] is not None else None
        items.append((item[0], float(item[1]), own))
    return items


def resolve_alignment(vector: SteeringVector, own: Alignment | None = None, override: Alignment | None = None) -> Alignment:
    """The alignment ``vector`` is placed by: ``override`` (``--align``), else its item's
    ``own``, else the one stored in the vector."""
    if override is not None:
        return parse_alignment(override)
    return parse_alignment(own if own is not None else vector.alignment)


@dataclass(frozen=True)
class Applied:
    """One vector as the engine holds it: which file rows go where."""

    vector: SteeringVector
    coeff: float
    align: Alignment
    offset: int | None  # first position of row 0; None for "all"


CLOSED = "this Llama is closed: load the model again (pyactadd.load_llama) to use it"


class LlamaGuard:
    """Stands in front of a ``llama_cpp.Llama``'s public methods so no call reaches a freed context.

    Every wrapped call counts as a use while it runs (a returned generator, such as a
    streamed completion, until it ends). ``close()`` marks the Llama closed at once, so any
    later call, and the next decode of a generation in progress on another thread, raises
    EngineError; the native objects are freed when the last use ends, on the thread that
    ends it, never under a running decode. A steering change is refused while a
    generation runs (:meth:`changing`), and holds off a generation about to start until
    the change is complete.
    """

    # Calls that decode or sample: a steering change must not overlap them.
    GENERATING = frozenset(
        {"eval", "sample", "generate", "create_completion", "create_chat_completion",
         "create_chat_completion_openai_v1", "embed", "create_embedding", "save_state", "load_state"}
    )
    # Public methods that touch no native object.
    PURE = frozenset({"set_cache", "set_seed", "close"})

    def __init__(self, llama) -> None:
        self._lock = threading.RLock()
        self._uses = 0
        self._generating = 0
        self._freed = False
        self.closed = False
        self._free_native = llama.close
        self._before_free: list[Callable[[], None]] = []
        for name, attribute in vars(_llama_class()).items():
            if name.startswith("_") or name in self.PURE or not callable(attribute) or isinstance(attribute, (staticmethod, classmethod)):
                continue
            setattr(llama, name, self._wrap(name, getattr(llama, name)))
        llama.close = self.close

    def _wrap(self, name: str, method: Callable) -> Callable:
        def guarded(*args, **kwargs):
            with self.using(name):
                result = method(*args, **kwargs)
            if isinstance(result, AnyIterator):
                return self._held(name, result)
            return result

        guarded.__name__ = name
        guarded.__doc__ = method.__doc__
        return guarded

    def _held(self, name: str, iterator: Iterator) -> Iterator:
        # A generator's body runs when it is iterated, not when it is made: hold the Llama
        # from the first item until it ends or is closed.
        with self.using(name):
            return (yield from iterator)

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Count one use of the Llama for the block; EngineError once it is closed."""
        generating = name in self.GENERATING
        with self._lock:
            if self.closed:
                raise EngineError(f"{CLOSED} ({name}() was called after close())")
            self._uses += 1
            self._generating += generating
        try:
            yield
        finally:
            with self._lock:
                self._uses -= 1
                self._generating -= generating
                free = self._take_free()
            if free:
                self._free()

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Hold the Llama for a steering change: EngineError when closed or while a generation runs."""
        with self._lock:
            if self.closed:
                raise EngineError(CLOSED)
            if self._generating:
                raise EngineError(
                    "steering cannot change while this Llama is generating: change it between completions "
                    "(a generation in progress keeps the steering it started with)"
                )
            yield

    def close(self) -> None:
        """Close the Llama: now when nothing uses it, else when the last use ends (idempotent)."""
        with self._lock:
            self.closed = True
            free = self._take_free()
        if free:
            self._free()

    def on_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` just before the native model is freed (a context made on it must go first)."""
        with self._lock:
            self._before_free.append(callback)

    def forget_free(self, callback: Callable[[], None]) -> None:
        """Undo :meth:`on_free` (no-op when ``callback`` is not registered)."""
        with self._lock:
            if callback in self._before_free:
                self._before_free.remove(callback)

    def _free(self) -> None:
        with self._lock:
            callbacks, self._before_free = self._before_free, []
        for callback in callbacks:
            callback()
        self._free_native()

    def _take_free(self) -> bool:
        # Under the lock: whether this caller is the one to free the native objects.
        if self.closed and self._uses == 0 and not self._freed:
            self._freed = True
            return True
        return False


def _llama_class():
    return llama_cpp_module().Llama


def check_open(llama) -> None:
    """Raise EngineError if ``llama`` is closed, InputError if it is not a ``llama_cpp.Llama``."""
    if not isinstance(llama, _llama_class()):
        raise InputError(f"llama must be a llama_cpp.Llama (pyactadd.load_llama makes one), got {type(llama).__name__}")
    guard = getattr(llama, "_pyactadd_guard", None)
    model = getattr(getattr(llama, "_model", None), "model", None)
    if (guard is not None and guard.closed) or model is None or getattr(getattr(llama, "_ctx", None), "ctx", None) is None:
        raise EngineError(CLOSED)


def model_fingerprint(llama) -> ModelFingerprint:
    """The fingerprint (architecture, n_embd, n_layer, n_vocab) of a loaded llama_cpp.Llama."""
    lc = llama_cpp_module()
    return ModelFingerprint(
        architecture=llama.metadata.get("general.architecture"),
        n_embd=int(llama.n_embd()),
        n_layer=int(lc.llama_model_n_layer(llama.model)),
        n_vocab=int(llama.n_vocab()),
    )


class Steering:
    """Per-position steering of one ``llama_cpp.Llama``.

    Create it once per Llama (it re-creates the Llama's context with the engine attached),
    then :meth:`set` vectors and :meth:`clear` them as often as needed. Every change
    resets the Llama's token cache, so a prompt prefix evaluated under other steering is
    never reused.

    Example::

        llm = llama_cpp.Llama(model_path, n_ctx=512)
        steering = Steering.of(llm)
        steering.set([(SteeringVector.load("love.gguf"), 4.0)])
        print(llm.create_completion("I hate you because")["choices"][0]["text"])
        steering.clear()
        # Two files, each placed by its own alignment (back needs the prompt length):
        steering.set([(love, 4.0, "front"), (calm, 2.0, "back")], prompt_length=len(ids))
    """

    def __init__(self, llama, *, force_device_copy: bool = False) -> None:
        check_open(llama)
        check_type(force_device_copy, bool, "force_device_copy", "True or False")
        engine_mod = engine_module()
        self._llama = llama
        self.fingerprint = model_fingerprint(llama)
        self._engine = engine_mod.Engine(self.fingerprint.n_embd, self.fingerprint.n_layer, force_device_copy)
        self._applied: list[Applied] = []
        self._cvec_active = False
        self._attach()
        self._guard: LlamaGuard = llama._pyactadd_guard

    @classmethod
    def of(cls, llama, *, force_device_copy: bool = False) -> "Steering":
        """The Steering attached to ``llama``, attaching one on first use.

        Raises:
            InputError: ``llama`` is not a ``llama_cpp.Llama``.
            EngineError: it is closed.
        """
        check_open(llama)
        existing = getattr(llama, "_pyactadd_steering", None)
        if existing is None:
            existing = cls(llama, force_device_copy=force_device_copy)
        else:
            existing.set_force_device_copy(force_device_copy)
        return existing

    def _attach(self) -> None:
        from llama_cpp import _internals

        llama = self._llama
        if getattr(llama, "_pyactadd_steering", None) is not None:
            raise EngineError("this Llama already has a pyactadd Steering: use Steering.of(llama)")
        params = llama.context_params
        self._engine.attach(ctypes.addressof(params))
        new_ctx = _internals.LlamaContext(model=llama._model, params=params, verbose=llama.verbose)
        old_ctx = llama._ctx
        llama._ctx = llama._stack.enter_context(contextlib.closing(new_ctx))
        old_ctx.close()
        # The engine is referenced from the C context through user_data, so it must live
        # as long as the Llama: keep it on the Llama itself.
        llama._pyactadd_steering = self
        llama._pyactadd_guard = LlamaGuard(llama)
        llama.reset()

    @property
    def closed(self) -> bool:
        """Whether the Llama has been closed (every method then raises EngineError)."""
        return self._guard.closed

    @property
    def guard(self) -> LlamaGuard:
        """The guard in front of the Llama: what else uses its model holds it through this."""
        return self._guard

    def _check_open(self) -> None:
        if self._guard.closed:
            raise EngineError(CLOSED)

    @property
    def applied(self) -> tuple[Applied, ...]:
        """The vectors currently in force."""
        return tuple(self._applied)

    def set_force_device_copy(self, force: bool) -> None:
        """Route every write through ggml-backend get/set, the path GPU buffers take (for tests)."""
        self._check_open()
        check_type(force, bool, "force_device_copy", "True or False")
        self._engine.set_force_device_copy(force)

    def stats(self) -> dict[str, int]:
        """The engine's counters (layer outputs steered, rows added, device copies, errors)."""
        self._check_open()
        return dict(self._engine.stats())

    def reset_stats(self) -> None:
        """Zero the engine's counters."""
        self._check_open()
        self._engine.reset_stats()

    def check_errors(self) -> None:
        """Raise EngineError if the engine had to skip a tensor since the last reset_stats()."""
        self._check_open()
        if self._engine.stats()["n_errors"]:
            message = self._engine.last_error()
            self._engine.reset_stats()
            raise EngineError(f"steering engine: {message}")

    def set(
        self,
        vectors: SteeringVector | Sequence[SteerItem],
        *,
        align: Alignment | None = None,
        prompt_length: int | None = None,
        use_llama_cvec: bool = True,
    ) -> None:
        """Replace the steering in force by ``vectors`` (each with a coefficient, optionally an alignment).

        Args:
            vectors: one vector (coefficient 1) or items ``(vector, coeff)`` or
                ``(vector, coeff, align)``; their rows sum, each placed by its own alignment
                (the item's, else the vector's).
            align: override every vector's alignment (``front``, ``back``, ``all`` or an offset).
            prompt_length: the number of prompt tokens, needed by ``back`` alignment.
            use_llama_cvec: apply ``all`` alignment through llama.cpp's control vector (no
                callback cost); False sends it through the engine, which the tests use to
                check the engine against llama.cpp.

        Raises:
            ModelMismatchError: a vector was made for another model.
            InputError: an argument of the wrong type (named), an alignment the vector cannot
                take, or a span that does not fit the context.
            EngineError: the Llama is closed, or is generating (change steering between completions).
        """
        self._check_open()
        if prompt_length is not None:
            check_count(prompt_length, "prompt_length")
        check_type(use_llama_cvec, bool, "use_llama_cvec", "True or False")
        items = steer_items(vectors)
        override = parse_alignment(align) if align is not None else None
        with self._guard.changing():
            n_ctx = int(self._llama.n_ctx())
            planned: list[Applied] = []
            for vector, coeff, own in items:
                vector.check_fits(self.fingerprint)
                check_coefficient(coeff)
                chosen = resolve_alignment(vector, own, override)
                planned.append(Applied(vector, coeff, chosen, self.first_position(vector, chosen, prompt_length, n_ctx)))
            self._apply(planned, use_llama_cvec)

    def clear(self) -> None:
        """Remove all steering; the Llama runs unsteered.

        Raises:
            EngineError: the Llama is closed, or is generating.
        """
        self._check_open()
        with self._guard.changing():
            self._apply([])

    @contextlib.contextmanager
    def steer(
        self,
        vectors: SteeringVector | Sequence[SteerItem],
        *,
        align: Alignment | None = None,
        prompt_length: int | None = None,
    ) -> Iterator["Steering"]:
        """Context manager: steering in force inside the block (as :meth:`set`), cleared after it."""
        self.set(vectors, align=align, prompt_length=prompt_length)
        try:
            yield self
        finally:
            if not self.closed:  # a closed Llama has no steering left to clear
                self.clear()

    @staticmethod
    def first_position(vector: SteeringVector, align: Alignment, prompt_length: int | None, n_ctx: int) -> int | None:
        """The position where ``vector``'s first row lands under ``align`` (``None`` for 'all').

        Raises:
            InputError: the alignment does not fit the vector, the prompt, or the context.
        """
        n_rows = vector.n_positions
        if align == "all":
            if n_rows != 1:
                raise InputError(
                    f"alignment 'all' adds one vector at every position, but this vector has {n_rows} rows: "
                    "use front/back/an offset, or reduce it to one row"
                )
            return None
        if align == "front":
            offset = 0
        elif align == "back":
            if prompt_length is None:
                raise InputError("alignment 'back' needs the prompt length")
            offset = prompt_length - n_rows
            if offset < 0:
                raise InputError(
                    f"back alignment: the vector spans {n_rows} positions but the prompt has only {prompt_length} tokens; "
                    "use front alignment or a longer prompt"
                )
        else:
            offset = int(align)
        if offset + n_rows > n_ctx:
            raise InputError(
                f"the steered span (positions {offset}..{offset + n_rows - 1}) does not fit the context of {n_ctx} tokens: "
                "raise --n-ctx or use a shorter vector"
            )
        return offset

    def _apply(self, planned: list[Applied], use_llama_cvec: bool = True) -> None:
        lc = llama_cpp_module()
        n_embd, n_layer = self.fingerprint.n_embd, self.fingerprint.n_layer
        # Checked before anything is cleared, so an overflow leaves the steering in force as it
        # was; one layer at a time, so a request's peak stays near the rows it adds.
        for item in planned:
            for layer in item.vector.layer_ids:
                scaled_rows(item.vector.layers[layer], item.coeff, layer)
        self._engine.clear()
        # llama.cpp's control vector covers block outputs 1..n_layer-1; one buffer for all.
        cvec = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
        use_cvec = False
        try:
            for item in planned:
                for layer in item.vector.layer_ids:
                    il = to_llama_index(layer)
                    rows = np.ascontiguousarray(scaled_rows(item.vector.layers[layer], item.coeff, layer), dtype=np.float32)
                    if item.offset is None and il >= 1 and use_llama_cvec:
                        cvec[il - 1] += rows[0]
                        use_cvec = True
                    elif item.offset is None:
                        self._engine.add(il, rows, 0, True)
                    else:
                        self._engine.add(il, rows, item.offset, False)
        except ValueError as exc:  # the engine's own validation; should not happen after check_fits
            self._engine.clear()
            raise EngineError(f"steering engine refused a vector: {exc}") from None
        ctx = self._llama.ctx
        if use_cvec:
            data = cvec.reshape(-1)
            rc = lc.llama_set_adapter_cvec(
                ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size, n_embd, 1, n_layer - 1
            )
            if rc != 0:
                self._engine.clear()
                raise EngineError("llama.cpp refused the control vector (llama_set_adapter_cvec failed)")
            self._cvec_active = True
        elif self._cvec_active:
            lc.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)
            self._cvec_active = False
        self._applied = planned
        # Positions already in the KV cache were computed under the old steering.
        self._llama.reset()
