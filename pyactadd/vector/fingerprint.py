"""What model a steering vector belongs to, and the number checks the value object and the file share.

:class:`ModelFingerprint` records the model's architecture and sizes, so applying rows to a
different model fails with a clear message instead of silently steering garbage. Depends
on numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyactadd.errors import InputError, SteeringFileError


@dataclass(frozen=True)
class ModelFingerprint:
    """What a steering vector was made for; ``None`` means "not known"."""

    architecture: str | None  # GGUF architecture name, e.g. "llama", "gemma3"
    n_embd: int
    n_layer: int | None
    n_vocab: int | None

    def __post_init__(self) -> None:
        if self.architecture is not None and (not isinstance(self.architecture, str) or not self.architecture):
            raise InputError(f"architecture must be a non-empty string or None, got {self.architecture!r}")
        check_int("n_embd", self.n_embd, minimum=1)
        if self.n_layer is not None:
            check_int("n_layer", self.n_layer, minimum=2)
        if self.n_vocab is not None:
            check_int("n_vocab", self.n_vocab, minimum=1)

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """Describe the first difference from ``other`` in one line, or return ``None``.

        Only fields known on both sides are compared, so a fingerprint with unknown
        ``n_layer`` matches any ``n_layer``.
        """
        for name in ("architecture", "n_embd", "n_layer", "n_vocab"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                return f"{name} {mine} != {theirs}"
        return None

    def merged(self, other: ModelFingerprint) -> ModelFingerprint:
        """Return a fingerprint with every field known on either side (they must not conflict)."""
        return ModelFingerprint(
            architecture=self.architecture if self.architecture is not None else other.architecture,
            n_embd=self.n_embd,
            n_layer=self.n_layer if self.n_layer is not None else other.n_layer,
            n_vocab=self.n_vocab if self.n_vocab is not None else other.n_vocab,
        )

    def describe(self) -> str:
        """Return e.g. ``"llama with n_embd 576, n_layer 30, n_vocab 49152"``."""
        parts = [f"n_embd {self.n_embd}"]
        if self.n_layer is not None:
            parts.append(f"n_layer {self.n_layer}")
        if self.n_vocab is not None:
            parts.append(f"n_vocab {self.n_vocab}")
        arch = self.architecture if self.architecture is not None else "an unknown architecture"
        return f"{arch} with {', '.join(parts)}"


def check_finite(rows: np.ndarray, what: str) -> None:
    """Raise :class:`SteeringFileError` naming ``what`` and the first row holding NaN or inf."""
    finite = np.isfinite(rows)
    if finite.all():
        return
    bad = np.argwhere(~finite)[0]
    row = int(bad[0]) if rows.ndim > 1 else 0
    value = rows[tuple(bad)]
    raise SteeringFileError(f"{what} row {row} holds {value}: steering rows must be finite; re-extract the vector")


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in ``[minimum, maximum]``; else raise :class:`InputError` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise InputError(f"{name} must be at least {minimum}{upper}, got {value}")
    return int(value)
