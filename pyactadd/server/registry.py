"""The server's steering vectors: loaded from ``--vectors DIR`` at start or uploaded, looked up by name.

A request names a vector (``"love"``), never a path: names are the file stems of the
``*.gguf`` files in the directory (``love.gguf`` → ``love``) or the name given at upload.
Every vector is checked against the served model once, when it is registered; one that
does not fit (another model's, a broken file) stays listed with ``usable: false`` and the
reason, and a request that names it gets a 400 saying why.

Uploads are bounded: at most ``max_vectors`` entries and ``max_bytes`` of rows (float32,
as held in memory) in all, files from ``--vectors`` included; an upload past either is
refused (:class:`RegistryFull`). An upload is read from memory (an anonymous in-memory
file on Linux) and is never written to disk; messages name the upload, never a path.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyactadd.errors import InputError, PyactaddError, SteeringFileError
from pyactadd.vector.value import ModelFingerprint, SteeringVector
from pyactadd.server.schemas import VECTOR_NAME

logger = logging.getLogger(__name__)

_uids = itertools.count(1)


class RegistryFull(InputError):
    """An upload would take the registry past its limits; ``status`` and ``code`` say which (409 count, 413 bytes)."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def vector_bytes(vector: SteeringVector) -> int:
    """The bytes ``vector``'s rows take in memory (float32)."""
    return sum(int(rows.nbytes) for rows in vector.layers.values())


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
    def nbytes(self) -> int:
        return vector_bytes(self.vector) if self.vector is not None else 0

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
            "bytes": self.nbytes,
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

    def __init__(self, fingerprint: ModelFingerprint, *, max_vectors: int | None = None, max_bytes: int | None = None) -> None:
        self.fingerprint = fingerprint
        self.max_vectors = max_vectors
        self.max_bytes = max_bytes
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
            RegistryFull: the registry's count or byte limit would be passed.
        """
        vector.check_fits(self.fingerprint)
        return self._put(VectorEntry(name, vector, origin, None, None, next(_uids)), limited=True)

    def add_gguf(self, name: str, data: bytes) -> VectorEntry:
        """Register the GGUF steering file ``data`` (bytes of an upload) under ``name``.

        Raises:
            RegistryFull: the registry is full (checked before the bytes are read, and again after).
            SteeringFileError: the bytes are not a steering file (the message names the upload).
            ModelMismatchError: the vector was made for another model.
        """
        with self._lock:
            self._check_room(name, 0)
        label = f"the upload {name!r}"
        with _in_memory_file(data) as path:
            try:
                vector = SteeringVector.load(path)
            except SteeringFileError as exc:
                raise SteeringFileError(str(exc).replace(path, label)) from None
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

    def total_bytes(self) -> int:
        """The bytes of every registered vector's rows."""
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def _put(self, entry: VectorEntry, *, limited: bool = False) -> VectorEntry:
        with self._lock:
            if limited:
                self._check_room(entry.name, entry.nbytes)
            self._entries[entry.name] = entry
        return entry

    def _check_room(self, name: str, nbytes: int) -> None:
        # Under the lock. An entry of the same name is replaced, so it frees its room.
        others = [entry for key, entry in self._entries.items() if key != name]
        if self.max_vectors is not None and len(others) + 1 > self.max_vectors:
            raise RegistryFull(
                f"this server holds at most {self.max_vectors} steering vectors (--max-vectors): "
                "delete one (DELETE /v1/steering/vectors/NAME) before uploading another",
                status=409,
                code="too_many_vectors",
            )
        used = sum(entry.nbytes for entry in others)
        if self.max_bytes is not None and used + nbytes > self.max_bytes:
            raise RegistryFull(
                f"this vector takes {nbytes} bytes and the server holds {used} of its {self.max_bytes} "
                "(--max-vector-bytes): delete vectors or upload a smaller one",
                status=413,
                code="vectors_too_large",
            )

    def _problem(self, vector: SteeringVector) -> str | None:
        try:
            vector.check_fits(self.fingerprint)
        except PyactaddError as exc:
            return str(exc)
        return None


@contextlib.contextmanager
def _in_memory_file(data: bytes):
    """A path that reads ``data``: an anonymous in-memory file on Linux (never on disk), else a
    private temp file removed at once."""
    if hasattr(os, "memfd_create") and sys.platform.startswith("linux"):
        handle = os.memfd_create("pyactadd-upload", os.MFD_CLOEXEC)
        try:
            _write_all(handle, data)
            yield f"/proc/self/fd/{handle}"
        finally:
            os.close(handle)
        return
    handle, temp = tempfile.mkstemp(suffix=".gguf", prefix="pyactadd-upload-")
    try:
        _write_all(handle, data)
        yield temp
    finally:
        os.close(handle)
        os.unlink(temp)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(handle, view):]
