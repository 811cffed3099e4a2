"""One conversion, source file to output file: what ``pyactadd convert`` and the scripts in convert/ run."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pyactadd.vector.fingerprint import ModelFingerprint
from pyactadd.vector.value import SteeringVector
from pyactadd.vector.convert.reading import Loaded, load
from pyactadd.vector.convert.reduce import Reduction, parse_reduction, reduce_vector
from pyactadd.vector.convert.writing import check_output, save_vector


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_file` read and wrote."""

    source: Path
    output: Path
    loaded: Loaded  # the source as read
    vector: SteeringVector  # as written
    llama_cpp: bool

    def messages(self, *, shift_layers: bool = False) -> list[str]:
        """One line saying what was written, then the notes about the source (for stderr)."""
        what = "stock llama.cpp control vector" if self.llama_cpp else f"{self.output.suffix.lstrip('.')} file"
        vector = self.vector
        lines = [
            f"Wrote {self.output} ({what}): layer {', '.join(str(layer) for layer in vector.layer_ids)}, "
            f"{vector.n_positions} row(s) x {vector.n_embd}, alignment {vector.alignment}; "
            f"read {self.source.name} as {self.loaded.producer} {self.loaded.kind}"
        ]
        for note in self.loaded.notes:
            if not (shift_layers and "--shift-layers" in note):
                lines.append(f"Note: {note}")
        return lines


def convert_file(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    layer_convention: str | None = None,
    shift_layers: bool = False,
    layers: Sequence[int] | None = None,
    stacked: bool = False,
    reduction: Reduction | str | None = None,
    llama_cpp: bool = False,
    to_convention: str | None = None,
    alignment: str | None = None,
    scale: float | None = None,
    model: ModelFingerprint | None = None,
) -> Converted:
    """Read ``source`` (see :func:`~pyactadd.vector.convert.load`), reduce it, and write ``output``.

    ``reduction`` (``row:K``, ``mean``, ``sum``) turns per-position rows into one row per
    layer before writing; ``alignment`` then applies to the reduced vector. ``llama_cpp``
    and ``to_convention`` are :func:`~pyactadd.vector.convert.save_vector`'s options.

    Raises:
        SteeringFileError: the source cannot be read or the output cannot be written.
        InputError: options that do not fit the file, or an output stock llama.cpp would refuse.
        ModelMismatchError: the vector does not fit ``model``.
    """
    source, output = Path(source), Path(output)
    check_output(output)
    how = parse_reduction(reduction) if reduction is not None else None
    loaded = load(
        source,
        layer_convention=layer_convention,
        shift_layers=shift_layers,
        layers=layers,
        stacked=stacked,
        model=model,
        alignment=None if how is not None else alignment,
        scale=scale,
    )
    vector = loaded.vector
    if how is not None:
        vector = reduce_vector(vector, how)
        if alignment is not None and alignment != "all":
            vector = dataclasses.replace(vector, alignment=alignment)
    save_vector(vector, output, llama_cpp=llama_cpp, layer_convention=to_convention)
    return Converted(source, output, loaded, vector, llama_cpp)
