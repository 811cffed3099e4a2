"""The command line of the converter scripts in the checkout's ``convert/`` folder.

``convert/convert_to_control_vector.py`` and ``convert/convert_from_control_vector.py``
call :func:`to_control_vector` and :func:`from_control_vector`. They parse with argparse
(no click) and run :func:`~pyactadd.vector.convert.convert_file`, the code behind
``pyactadd convert``, so their output is byte-identical to it. Like llama.cpp's scripts,
a failure prints ``PROG: error: ...`` on stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Sequence

from pyactadd.errors import InputError, PyactaddError
from pyactadd.vector.convert.conventions import LAYER_CONVENTIONS
from pyactadd.vector.convert.converting import convert_file
from pyactadd.vector.layers import MAX_LAYER

_LAYERS = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)  # not \d: it takes any script's digits


def parse_layer_spec(text: str) -> list[int]:
    """Parse ``6``, ``3-20`` or ``3,5,7`` (pyactadd block-input layers) into a list.

    Both ends of a range are checked against :data:`MAX_LAYER` before it is expanded.

    Raises:
        InputError: naming the three forms, a range that runs backwards, or a layer no
            model has.
    """
    layers: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        match = _LAYERS.fullmatch(part)
        if match is None:
            raise InputError(f"{text!r} is not a layer, a range A-B or a list A,B (block-input numbers)")
        for number in filter(None, match.groups()):
            if len(number) > 9 or int(number) > MAX_LAYER:
                raise InputError(f"layer {number} in {part!r} is past any model's blocks: use layers 1 to n_layer - 1")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise InputError(f"range {part!r} runs backwards: write {last}-{first}")
        layers.extend(range(first, last + 1))
    return layers


def to_control_vector(argv: Sequence[str] | None = None) -> int:
    """``convert_to_control_vector.py SOURCE -o OUT.gguf``: any steering file -> a stock llama.cpp control vector."""
    return _main(_TO, argv)


def from_control_vector(argv: Sequence[str] | None = None) -> int:
    """``convert_from_control_vector.py SOURCE -o OUT``: a control vector -> a pyactadd file or tensors."""
    return _main(_FROM, argv)


@dataclass(frozen=True)
class _Script:
    prog: str
    description: str
    output: str  # metavar of -o
    options: tuple[tuple[str, dict], ...]  # (flag, argparse keywords): the options only this script has
    fixed: tuple[tuple[str, object], ...] = ()  # convert_file arguments the script always passes


_TO = _Script(
    "convert_to_control_vector.py",
    "Convert a repeng, dialz, steering-vectors, cvector-generator, pyactadd or tensor file (.safetensors, "
    ".npy, .npz, .pt) to a stock llama.cpp control vector for `llama-cli --control-vector`.",
    "OUT.gguf",
    (("--reduce", {"dest": "reduction", "help": "Reduce per-position rows to one per layer: row:K, mean or sum."}),),
    (("llama_cpp", True),),
)
_FROM = _Script(
    "convert_from_control_vector.py",
    "Convert a llama.cpp control vector (or any file the other script reads) to a pyactadd steering file "
    "(.gguf) or to per-layer tensors (.safetensors, .npz, .pt).",
    "OUT",
    (
        ("--to-convention", {"choices": LAYER_CONVENTIONS, "help": "How a tensor OUTPUT numbers layers (required for them)."}),
        ("--align", {"dest": "alignment", "choices": ("front", "back", "all"), "help": "Alignment of the result."}),
    ),
)


def _main(script: _Script, argv: Sequence[str] | None) -> int:
    parser = _parser(script.prog, script.description, script.output)
    dests = [parser.add_argument(flag, default=None, **keywords).dest for flag, keywords in script.options]
    args = parser.parse_args(argv)
    fixed = dict(script.fixed)
    if fixed.get("llama_cpp") and not args.output.lower().endswith(".gguf"):
        parser.error(f"{args.output} should end in .gguf: a llama.cpp control vector is a GGUF file")
    return _run(parser, args, **{dest: getattr(args, dest) for dest in dests}, **fixed)


def _parser(prog: str, description: str, output: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("source", metavar="SOURCE", help="The file to convert.")
    parser.add_argument("-o", "--output", required=True, metavar=output, help="The file to write (atomically).")
    parser.add_argument(
        "--layer-convention",
        choices=LAYER_CONVENTIONS,
        default=None,
        help="How a tensor file numbers layers: block-input (hidden_states[i]) or block-output (the output of "
        "block i: repeng, steering-vectors). Required for tensor files.",
    )
    parser.add_argument(
        "--shift-layers",
        action="store_true",
        help="cvector-generator files: put direction.N at block input L = N, where it was computed.",
    )
    parser.add_argument(
        "-l", "--layer", action="append", default=[], metavar="L|A-B|A,B", help="Keep only these pyactadd layers L (repeatable)."
    )
    parser.add_argument("--stacked", action="store_true", help="A lone array's first axis is the layer index.")
    parser.add_argument("--scale", type=float, default=None, help="Multiply every row (-1 flips the sign).")
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, **options: object) -> int:
    try:
        layers = [layer for spec in args.layer for layer in parse_layer_spec(spec)] or None
        converted = convert_file(
            args.source,
            args.output,
            layer_convention=args.layer_convention,
            shift_layers=args.shift_layers,
            layers=layers,
            stacked=args.stacked,
            scale=args.scale,
            **options,  # type: ignore[arg-type]
        )
    except PyactaddError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    for line in converted.messages(shift_layers=args.shift_layers):
        print(line, file=sys.stderr)
    return 0
