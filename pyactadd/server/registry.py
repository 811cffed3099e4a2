"""The server's steering vectors: loaded from ``--vectors DIR`` at start or uploaded, looked up by name.

A request names a vector (``"love"``), never a path: names are the file stems of the
``*.gguf`` files in the directory (``love.gguf`` → ``love``) or the name given at upload.
Every vector is checked against the served model once, when it is registered; one that
does not fit (another model's, a broken file) stays listed with ``usable: false`` and the
reason, and a request that names it gets a 400 saying why.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyactadd.errors import PyactaddError
from pyactadd.vector.value import ModelFingerprint, SteeringVector
from pyactadd.server.schemas import VECTOR_NAME

logger = logging.getLogger(__name__)

_uids = itertools.count(1)


@dataclass(frozen=True)
class VectorEntry:
    """One registered vector. ``uid`` is new for every registration, so a replaced vector never
    counts as "the steering already in force"."""

    name: str
    vector: SteeringVector | None
    origin: str  # "file" or "upload"
    file: str | None  # the file's name in --vectors DIR (never the full path)
    problem: str | None  # why it cannot be used on this model; None when usable
    uid: int

    @property
    def usable(self) -> bool:
        return self.problem is None

    def describe(self) -> dict[str, Any]:
        """The entry as GET /v1/steering/vectors lists it."""
        info: dict[str, Any] = {
            "id": self.name,
            "object": "steering.vector",
            "usable": self.usable,
            "error": self.problem,
            "origin": self.origin,
            "file": self.file,
        }
        vector = self.vector
        if vector is not None:
            fingerprint = vector.fingerprint
            info.update(
                layers=vector.layer_ids,
                n_positions=vector.n_positions,
                alignment=vector.alignment,
                coefficient=vector.coefficient,
                positive=vector.positive,
                negative=vector.negative,
                anchor=vector.anchor,
                source=vector.source,
                model={
                    "architecture": fingerprint.architecture,
                    "n_embd": fingerprint.n_embd,
                    "n_layer": fingerprint.n_layer,
                    "n_vocab": fingerprint.n_vocab,
                },
            )
        return info


class VectorRegistry:
    """Named steering vectors for one model (thread-safe)."""

    def __init__(self, fingerprint: ModelFingerprint) -> None:
        self.fingerprint = fingerprint
        self._entries: dict[str, VectorEntry] = {}
        self._lock = threading.Lock()

    def load_dir(self, directory: str | os.PathLike[str]) -> list[VectorEntry]:
        """Register every ``*.gguf`` in ``directory`` (not recursive); return the new entries.

        A file whose stem is not a valid name is skipped with a warning; a file that cannot
        be read or does not fit the model is registered as unusable, with the reason.

        Raises:
            PyactaddError: ``directory`` is not a directory.
        """
        from pyactadd.errors import InputError

        root = Path(directory)
        if not root.is_dir():
            raise InputError(f"--vectors {directory}: not a directory (give a folder of .gguf steering files)")
        added = []
        for path in sorted(root.glob("*.gguf")):
            if not path.is_file():
                continue
            if not VECTOR_NAME.fullmatch(path.stem):
                logger.warning("skipping %s: %r is not a usable vector name", path.name, path.stem)
                continue
            try:
                vector: SteeringVector | None = SteeringVector.load(path)
                problem = self._problem(vector)
            except PyactaddError as exc:
                # Name the file, not where it lies on the server.
                vector, problem = None, str(exc).replace(str(path), path.name)
            if problem is not None:
                logger.info("vector %s cannot be used: %s", path.stem, problem)
            added.append(self._put(VectorEntry(path.stem, vector, "file", path.name, problem, next(_uids))))
        return added

    def add(self, name: str, vector: SteeringVector, *, origin: str = "upload") -> VectorEntry:
        """Register ``vector`` under ``name`` (replacing any entry of that name); it must fit the model.

        Raises:
            ModelMismatchError: the vector was made for another model.
        """
        vector.check_fits(self.fingerprint)
        return self._put(VectorEntry(name, vector, origin, None, None, next(_uids)))

    def add_gguf(self, name: str, data: bytes) -> VectorEntry:
        """Register the GGUF steering file ``data`` (bytes of an upload) under ``name``.

        Raises:
            SteeringFileError: the bytes are not a steering file.
            ModelMismatchError: the vector was made for another model.
        """
        handle, temp = tempfile.mkstemp(suffix=".gguf", prefix="pyactadd-upload-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            vector = SteeringVector.load(temp)
        finally:
            os.unlink(temp)
        return self.add(name, vector, origin="upload")

    def remove(self, name: str) -> bool:
        """Forget ``name``; return whether it was registered."""
        with self._lock:
            return self._entries.pop(name, None) is not None

    def get(self, name: str) -> VectorEntry | None:
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[VectorEntry]:
        """All entries, sorted by name."""
        with self._lock:
            return [self._entries[name] for name in sorted(self._entries)]

    def _put(self, entry: VectorEntry) -> VectorEntry:
        with self._lock:
            self._entries[entry.name] = entry
        return entry

    def _problem(self, vector: SteeringVector) -> str | None:
        try:
            vector.check_fits(self.fingerprint)
        except PyactaddError as exc:
            return str(exc)
        return None
