"""The steering vector value object: per-layer, per-position rows plus what they were made for.

A :class:`SteeringVector` holds, for each steering layer ``L`` (block-input numbering, see
:mod:`pyactadd.vector.layers`), a float32 array of shape ``[P, n_embd]``: row ``p`` is added to the
residual stream at prompt position ``p`` (counted from where ``alignment`` says). The
:class:`ModelFingerprint` (:mod:`pyactadd.vector.fingerprint`) records which model the rows
belong to.

:meth:`SteeringVector.save` and :meth:`SteeringVector.load` are the way to write and read
pyactadd steering files; the format itself lives in :mod:`pyactadd.vector.gguf_file`, which
knows nothing of this class (imports go one way: value -> gguf_file). It is imported on
first use: gguf's import time is not something ``import pyactadd`` or ``pyactadd --help``
should pay.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pyactadd.errors import InputError, ModelMismatchError
from pyactadd.vector.fingerprint import ModelFingerprint, check_finite, check_int
from pyactadd.vector.layers import check_layer

if TYPE_CHECKING:
    from pyactadd.vector.gguf_file import SteeringFile

__all__ = ["ALIGNMENTS", "SOURCES", "ModelFingerprint", "SteeringVector", "check_coefficient", "check_finite", "scaled_rows"]

ALIGNMENTS = ("front", "back", "all")
SOURCES = ("pyactadd", "llama.cpp")

_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_coefficient(coeff: float) -> None:
    """Raise :class:`InputError` unless ``coeff`` is finite and within float32's range (steering rows are float32).

    A coefficient beyond float32's range would turn every row into inf; that is named as an
    overflow of the coefficient, not as a broken vector.
    """
    if not math.isfinite(coeff):
        raise InputError(f"coefficient must be a finite number, got {coeff!r}")
    if abs(coeff) > _FLOAT32_MAX:
        raise InputError(
            f"coefficient {coeff:g} overflows float32 (steering rows are float32, at most {_FLOAT32_MAX:.3g}): "
            "use a smaller coefficient"
        )


def scaled_rows(rows: np.ndarray, coeff: float, layer: int) -> np.ndarray:
    """``coeff * rows`` in float32 arithmetic (the rows' own dtype when wider), refused if the product overflows.

    Raises:
        InputError: ``coeff`` or the product leaves float32's range; the message names the
            overflow and the largest coefficient these rows take.
    """
    check_coefficient(coeff)
    with np.errstate(over="ignore", invalid="ignore"):
        product = np.float32(coeff) * rows
    if np.isfinite(product).all() or not np.isfinite(rows).all():
        return product  # non-finite input rows are the vector's own fault, reported by check_finite
    peak = float(np.abs(rows).max())
    raise InputError(
        f"coefficient {coeff:g} overflows float32 when it scales the vector at layer {layer} "
        f"(largest entry {peak:.3g}): use a coefficient of at most {_FLOAT32_MAX / peak:.3g}"
    )


@dataclass(eq=False)
class SteeringVector:
    """Per-layer, per-position steering rows for one model.

    ``layers[L]`` is a C-contiguous float32 array ``[P, n_embd]`` added at the input of
    block ``L``; every layer has the same ``P``. ``coefficient`` is already multiplied into
    the rows and is kept as metadata only (rounded to float32, as the file stores it).
    ``zeroed_rows`` names the rows extraction set to zero (attention sinks), ``{L: [p, ...]}``.
    Construction validates everything and raises :class:`InputError` for malformed
    arguments and :class:`SteeringFileError` for NaN/inf rows.
    """

    layers: dict[int, np.ndarray]
    fingerprint: ModelFingerprint
    alignment: str = "front"  # "front" | "back" | "all"
    coefficient: float = 1.0
    positive: str | None = None
    negative: str | None = None
    positive_ids: list[int] | None = None
    negative_ids: list[int] | None = None
    anchor: str = "none"  # "none", "bos", or the anchor token's text
    anchor_id: int | None = None
    pad_id: int | None = None
    model_hint: str | None = None  # controlvector.model_hint; defaults to fingerprint.architecture
    source: str = "pyactadd"  # "pyactadd" or "llama.cpp" (a stock 1-D control vector file)
    extra: dict[str, object] = field(default_factory=dict)
    zeroed_rows: dict[int, list[int]] = field(default_factory=dict)

    # Make numpy defer to our reflected operators: np.float32(2) * v calls v.__rmul__.
    __array_ufunc__ = None

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, ModelFingerprint):
            raise InputError(f"fingerprint must be a ModelFingerprint, got {type(self.fingerprint).__name__}")
        self.layers = self._checked_layers(self.layers)
        if self.alignment not in ALIGNMENTS:
            raise InputError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {self.alignment!r}")
        if isinstance(self.coefficient, bool) or not isinstance(self.coefficient, numbers.Real):
            raise InputError(f"coefficient must be a number, got {self.coefficient!r}")
        check_coefficient(self.coefficient)
        self.coefficient = float(np.float32(self.coefficient))
        for name in ("positive", "negative", "model_hint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"{name} must be a string or None, got {type(value).__name__}")
        if not isinstance(self.anchor, str):
            raise InputError(f"anchor must be a string ('none', 'bos' or the anchor token's text), got {self.anchor!r}")
        self.positive_ids = _checked_ids("positive_ids", self.positive_ids)
        self.negative_ids = _checked_ids("negative_ids", self.negative_ids)
        for name in ("anchor_id", "pad_id"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, check_int(name, value, minimum=0, maximum=_INT32_MAX))
        if self.model_hint is None:
            self.model_hint = self.fingerprint.architecture
        if self.source not in SOURCES:
            raise InputError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        self.extra = _checked_extra(self.extra)
        self.zeroed_rows = _checked_zeroed_rows(self.zeroed_rows)

    def _checked_layers(self, layers: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        if not isinstance(layers, dict) or not layers:
            raise InputError("a steering vector needs at least one layer: pass layers={L: rows}")
        by_layer: dict[int, object] = {}
        for key, value in layers.items():
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
                raise InputError(f"layer keys must be integers, got {key!r}")
            layer = int(key)
            if layer < 1:
                raise InputError(
                    f"layer {layer} is out of range: steering layers start at 1 "
                    "(L is the residual stream entering block L)"
                )
            if self.fingerprint.n_layer is not None:
                check_layer(layer, self.fingerprint.n_layer)
            by_layer[layer] = value
        checked: dict[int, np.ndarray] = {}
        n_positions: int | None = None
        for layer in sorted(by_layer):
            rows = _as_rows(layer, by_layer[layer])
            if rows.shape[1] != self.fingerprint.n_embd:
                raise InputError(
                    f"layer {layer} has n_embd {rows.shape[1]} but the fingerprint says {self.fingerprint.n_embd}"
                )
            if n_positions is None:
                n_positions = rows.shape[0]
            elif rows.shape[0] != n_positions:
                raise InputError(
                    f"layer {layer} has {rows.shape[0]} positions but layer {min(checked)} has {n_positions}: "
                    "all layers must have the same number of rows"
                )
            check_finite(rows, f"layer {layer}")
            checked[layer] = rows
        return checked

    @property
    def n_positions(self) -> int:
        """Number of rows ``P`` per layer."""
        return next(iter(self.layers.values())).shape[0]

    @property
    def n_embd(self) -> int:
        """Width of each row (the model's embedding size)."""
        return self.fingerprint.n_embd

    @property
    def layer_ids(self) -> list[int]:
        """Steering layers ``L`` in ascending order."""
        return sorted(self.layers)

    def row_norms(self) -> dict[int, np.ndarray]:
        """Return the L2 norm of every row, ``{L: float32 array [P]}``."""
        return {layer: np.linalg.norm(rows, axis=1).astype(np.float32) for layer, rows in self.layers.items()}

    def check_fits(self, fingerprint: ModelFingerprint) -> None:
        """Raise :class:`ModelMismatchError` unless this vector can be applied to the model ``fingerprint``.

        For vectors read from stock llama.cpp files the architecture is only a hint
        (repeng writes transformers' model type there), so only ``n_embd`` and the layer
        range are checked, as llama.cpp itself does.
        """
        mine = self.fingerprint
        if self.source == "llama.cpp":
            mine = dataclasses.replace(mine, architecture=None)
        if mine.mismatch(fingerprint) is not None:
            raise ModelMismatchError(
                f"steering vector was made for {self.fingerprint.describe()} but the model is "
                f"{fingerprint.describe()}: extract a vector on this model"
            )
        if fingerprint.n_layer is not None and self.layer_ids[-1] > fingerprint.n_layer - 1:
            raise ModelMismatchError(
                f"steering vector has layer {self.layer_ids[-1]} but the model has only {fingerprint.n_layer} blocks "
                f"(layers 1 to {fingerprint.n_layer - 1}): extract a vector on this model"
            )

    def _scaled(self, factor: float) -> SteeringVector:
        return dataclasses.replace(
            self,
            layers={layer: scaled_rows(rows, factor, layer) for layer, rows in self.layers.items()},
            coefficient=self.coefficient * factor,
            extra=dict(self.extra),
        )

    def __mul__(self, factor: object) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        return self._scaled(float(factor))

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> SteeringVector:
        if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
            return NotImplemented
        if divisor == 0:
            raise InputError("cannot divide a steering vector by zero")
        return self._scaled(1.0 / float(divisor))

    def __neg__(self) -> SteeringVector:
        return self._scaled(-1.0)

    def __add__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self._combined(other, sign=1.0)

    def __sub__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self._combined(other, sign=-1.0)

    def _combined(self, other: SteeringVector, sign: float) -> SteeringVector:
        """Add ``sign * other`` layer by layer; pad the shorter rows with zeros.

        Padding goes at the end for "front" and "all" alignment and at the start for
        "back" alignment, so rows stay attached to the prompt positions they were made for.
        Metadata that describes only one operand (prompts, tokens, coefficient) is dropped.
        """
        problem = self.fingerprint.mismatch(other.fingerprint)
        if problem is not None:
            raise ModelMismatchError(
                f"cannot combine steering vectors made for different models ({problem}): extract both on the same model"
            )
        if self.alignment != other.alignment:
            raise InputError(
                f"cannot combine a {self.alignment!r}-aligned and a {other.alignment!r}-aligned steering vector: "
                "extract both with the same alignment"
            )
        n_positions = max(self.n_positions, other.n_positions)
        at_start = self.alignment == "back"
        zeros = np.zeros((n_positions, self.n_embd), dtype=np.float32)
        layers: dict[int, np.ndarray] = {}
        for layer in sorted(set(self.layers) | set(other.layers)):
            total = zeros.copy()
            for rows, weight in ((self.layers.get(layer), 1.0), (other.layers.get(layer), sign)):
                if rows is None:
                    continue
                target = total[n_positions - rows.shape[0]:] if at_start else total[: rows.shape[0]]
                target += rows * np.float32(weight)
            layers[layer] = total
        return SteeringVector(
            layers=layers,
            fingerprint=self.fingerprint.merged(other.fingerprint),
            alignment=self.alignment,
            anchor=self.anchor if self.anchor == other.anchor else "none",
            anchor_id=self.anchor_id if self.anchor_id == other.anchor_id else None,
            pad_id=self.pad_id if self.pad_id == other.pad_id else None,
            model_hint=self.model_hint if self.model_hint == other.model_hint else None,
            source=self.source if self.source == other.source else "pyactadd",
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        scalars = [f.name for f in dataclasses.fields(self) if f.name != "layers"]
        return (
            all(getattr(self, name) == getattr(other, name) for name in scalars)
            and self.layer_ids == other.layer_ids
            and all(np.array_equal(self.layers[layer], other.layers[layer]) for layer in self.layers)
        )

    def __repr__(self) -> str:
        parts = [
            f"{self.fingerprint.architecture or 'unknown'} n_embd={self.n_embd}",
            f"layers={self.layer_ids}",
            f"n_positions={self.n_positions}",
            f"alignment={self.alignment!r}",
            f"coefficient={self.coefficient:g}",
        ]
        for name in ("positive", "negative"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={_shorten(value)!r}")
        if self.source != "pyactadd":
            parts.append(f"source={self.source!r}")
        return f"SteeringVector({', '.join(parts)})"

    def save(self, path: str | os.PathLike[str], *, llama_cpp: bool = False) -> None:
        """Write this vector to a GGUF steering file, atomically.

        With ``llama_cpp`` the file is a stock llama.cpp control vector (no ``pyactadd.*``
        keys, 1-D ``direction.<L-1>``), exactly as repeng and cvector-generator write it.

        Raises:
            InputError: ``llama_cpp`` and a vector stock llama.cpp cannot load (the message names the fix).
            SteeringFileError: a row holds NaN/inf, or the file cannot be written.
        """
        from pyactadd.vector import gguf_file

        gguf_file.write_steering_file(self, path, bare=llama_cpp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVector:
        """Read a steering file written by pyactadd or a stock llama.cpp control vector.

        Stock files (``cvector-generator``, repeng) have no ``pyactadd.*`` keys and load as
        alignment "all", source "llama.cpp", with the fingerprint's architecture taken from
        ``controlvector.model_hint``.

        Raises:
            SteeringFileError: for every problem, naming the file and the fix.
        """
        from pyactadd.vector import gguf_file

        return cls.from_file(gguf_file.read_file(path))

    @classmethod
    def from_file(cls, found: SteeringFile) -> SteeringVector:
        """Build the vector a :func:`pyactadd.vector.gguf_file.read_file` result describes.

        Raises:
            SteeringFileError: the file's fields do not make a valid vector.
        """
        return found.build(cls)


def _as_rows(layer: int, value: object) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InputError(f"layer {layer} must be a numpy array, got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.floating):
        raise InputError(f"layer {layer} must hold floating-point numbers, got dtype {value.dtype}")
    if value.ndim == 1:
        value = value.reshape(1, -1)
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise InputError(f"layer {layer} must have shape [P, n_embd] or [n_embd], got {list(value.shape)}")
    # Native byte order too: a big-endian float32 array would be written byte-swapped.
    return np.ascontiguousarray(value, dtype=np.float32)


def _checked_ids(name: str, ids: object) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InputError(f"{name} must be a list of token ids or None, got {ids!r}")
    checked = [check_int(f"{name} entry", token, minimum=0, maximum=_INT32_MAX) for token in ids]
    if not checked:
        # GGUF writers (gguf-py and llama.cpp alike) cannot store an empty array.
        raise InputError(f"{name} is empty: pass None when there are no token ids")
    return checked


def _checked_extra(extra: object) -> dict[str, object]:
    if not isinstance(extra, dict):
        raise InputError(f"extra must be a dict of str to str/int/float/bool, got {type(extra).__name__}")
    checked: dict[str, object] = {}
    for key, value in extra.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"extra keys must be non-empty strings, got {key!r}")
        if key == "zeroed_rows":
            raise InputError("zeroed_rows is a field of SteeringVector, not an extra: pass zeroed_rows={L: [rows]}")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float, bool)):
            raise InputError(f"extra[{key!r}] must be a string or a number, got {type(value).__name__}")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise InputError(f"extra[{key!r}] = {value} does not fit in 64 bits")
        checked[key] = value
    return checked


def _checked_zeroed_rows(zeroed: object) -> dict[int, list[int]]:
    if not isinstance(zeroed, dict):
        raise InputError(f"zeroed_rows must be a dict of layer to row numbers, got {type(zeroed).__name__}")
    checked: dict[int, list[int]] = {}
    for layer, rows in zeroed.items():
        layer = check_int("zeroed_rows layer", layer, minimum=1)
        if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
            raise InputError(f"zeroed_rows[{layer}] must be a list of row numbers, got {rows!r}")
        numbers_ = sorted({check_int(f"zeroed_rows[{layer}] entry", row, minimum=0) for row in rows})
        if numbers_:
            checked[layer] = numbers_
    return checked


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
