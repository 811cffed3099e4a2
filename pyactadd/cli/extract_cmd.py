"""``pyactadd extract``: a prompt pair (or a pairs file) → a steering file (the PyTorch stage)."""

from __future__ import annotations

from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import FiniteFloat, model_option, apply_options

_PAIRS_OPTIONS = [
    click.option(
        "--pairs",
        "pairs_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help='JSONL file of prompt pairs, one {"positive": ..., "negative": ...} per line (instead of -p/-n).',
    ),
    click.option(
        "--method",
        type=click.Choice(["actadd", "mean", "pca"]),
        default=None,
        help="With --pairs: actadd (per-position mean of padded differences), mean (mean last-token difference) "
        "or pca (first principal component of the last-token differences, scaled to the mean difference along it). "
        "Default: actadd.",
    ),
    click.option(
        "--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True, help="With --pairs: pairs per forward pass."
    ),
    click.option("--pca-center", is_flag=True, help="With --method pca: center the differences first (repeng's pca_diff)."),
]

_ROW_OPTIONS = [
    click.option(
        "-l",
        "--layer",
        "layers",
        type=int,
        multiple=True,
        required=True,
        help="Block-input layer L (the residual stream entering block L, 1..n_layer-1). Repeat for several layers.",
    ),
    click.option("-c", "--coeff", type=FiniteFloat(), default=1.0, show_default=True, help="Coefficient baked into the file."),
    click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="GGUF file to write."),
    model_option,
    click.option("--pad", default=" ", show_default="' '", help="Single-token text that right-pads the shorter prompt."),
    click.option(
        "--anchor",
        default="none",
        show_default=True,
        help="Token prepended to both prompts (and to the prompt at run time): 'none', 'bos', or a token such as "
        "'<|im_start|>'. A shared first token keeps row 0 at zero, away from the attention sink.",
    ),
    click.option("--zero-row", "zero_rows", type=int, multiple=True, help="Set the steering row at this position to zero (repeatable)."),
    click.option("--zero-outliers", is_flag=True, help="Zero rows whose norm is far above the prompts' typical residual norm."),
    click.option(
        "--backend",
        type=click.Choice(["torch", "llama"]),
        default="torch",
        show_default=True,
        help="Where the prompts run: torch (float32 PyTorch, the paper's numerics) or llama (inside llama.cpp on the "
        "file's own quantized weights: any architecture llama.cpp runs, fast start, no PyTorch).",
    ),
    click.option(
        "--n-gpu-layers",
        type=click.IntRange(min=-1),
        default=None,
        help="With --backend llama: layers llama.cpp offloads to a GPU (-1: all; a CPU-only build ignores it). Default: 0.",
    ),
]


@main.command("extract")
@click.option("-p", "--positive", default=None, help="The prompt to steer towards, e.g. 'Love'.")
@click.option("-n", "--negative", default=None, help="The prompt to steer away from, e.g. 'Hate'.")
@apply_options(_PAIRS_OPTIONS)
@apply_options(_ROW_OPTIONS)
def extract_command(positive, negative, pairs_file, method, batch_size, pca_center, output, **options):
    """Extract a steering tensor from a prompt pair (or many pairs) and save it as GGUF.

    Runs both prompts through the model in PyTorch, records the residual stream entering
    each chosen block at every position, and writes COEFF x (positive - negative) as a
    [positions x n_embd] tensor per layer. The first use of a GGUF model converts it to
    PyTorch weights once; later runs load them from the cache. With --backend llama the
    prompts run inside llama.cpp on the file's own quantized weights instead (the file
    records it; `pyactadd compare` shows how close two files are).

    With --pairs FILE.jsonl, many pairs go through the model in batches and --method
    combines them: actadd averages the per-position differences (alignment front); mean
    and pca read each prompt's last token and write one row per layer (alignment all,
    which stock llama.cpp can load too).

    \b
    Examples:
      pyactadd extract -p Love -n Hate -l 6 -o love.gguf
      pyactadd extract -p " weddings" -n " " -l 16 --anchor "<|im_start|>" -o weddings.gguf
      pyactadd extract --pairs happy.jsonl --method mean -l 6 -l 10 -l 14 -o happy.gguf
      pyactadd extract -p Love -n Hate -l 6 --backend llama -o love-q.gguf
    """
    from pyactadd.default_model import resolve_model

    if output.suffix.lower() != ".gguf":
        raise click.BadParameter(f"{output} should end in .gguf", param_hint="--output")
    if pairs_file is not None and (positive is not None or negative is not None):
        raise click.UsageError("give either --pairs or -p/--positive with -n/--negative, not both")
    if pairs_file is None and (positive is None or negative is None):
        raise click.UsageError("give -p/--positive and -n/--negative (a prompt pair), or --pairs FILE.jsonl")
    if pairs_file is None and (method is not None or pca_center):
        raise click.UsageError("--method and --pca-center apply to --pairs only")
    if options["n_gpu_layers"] is not None and options["backend"] != "llama":
        raise click.BadParameter("applies to --backend llama only (the PyTorch backend runs on the CPU)", param_hint="--n-gpu-layers")
    options["layers"] = list(options["layers"])
    _check_coeff(options["coeff"])
    if pairs_file is not None:
        _extract_pairs(pairs_file, method or "actadd", batch_size, pca_center, output, options)
        return
    from pyactadd.extract.pipeline import extract

    options["model"] = resolve_model(options["model"])
    _save(extract(positive, negative, progress=True, **options), output, options)


def _check_coeff(coeff: float) -> None:
    """Refuse a coefficient the float32 rows cannot hold before the model runs."""
    from pyactadd.errors import PyactaddError
    from pyactadd.vector.value import check_coefficient

    try:
        check_coefficient(coeff)
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint="--coeff") from None


def _extract_pairs(pairs_file: Path, method: str, batch_size: int, pca_center: bool, output: Path, options: dict) -> None:
    from pyactadd.default_model import resolve_model
    from pyactadd.extract.pairs import extract_pairs
    from pyactadd.prompts.pairs import load_pairs

    pairs = load_pairs(pairs_file)
    options["model"] = resolve_model(options["model"])
    vector = extract_pairs(pairs, method=method, batch_size=batch_size, pca_center=pca_center, progress=True, **options)
    _save(vector, output, options, how=f"{method} over {len(pairs)} pairs, ")


def _save(vector, output: Path, options: dict, how: str = "") -> None:
    """Write the file, then say what it holds (on stderr: stdout stays free for pipes)."""
    vector.save(output)
    layers_text = ", ".join(str(layer) for layer in vector.layer_ids)
    click.echo(
        f"Wrote {output}: {how}layer {layers_text}, {vector.n_positions} position{'s' if vector.n_positions != 1 else ''} "
        f"x {vector.n_embd}, alignment {vector.alignment}, coeff {options['coeff']:g} ({options['model'].name})",
        err=True,
    )
