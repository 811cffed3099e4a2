"""``pyactadd compare``: per-layer, per-row cosine between two steering files for the same pair."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pyactadd.cli import main


@main.command("compare")
@click.argument("first", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def compare_command(first, second, as_json):
    """Compare SECOND against FIRST, layer by layer and row by row: cosine, norms, norm ratio.

    Made for one pair extracted two ways, e.g. float32 PyTorch and llama.cpp on the
    quantized weights, to see how well the float32 vector transfers. Rows that are zero
    in either file (an anchor's row) have no cosine.

    \b
    Examples:
      pyactadd extract -p Love -n Hate -l 6 -o love.gguf
      pyactadd extract -p Love -n Hate -l 6 --backend llama -o love-q.gguf
      pyactadd compare love.gguf love-q.gguf
    """
    from pyactadd.vector.compare import compare_vectors
    from pyactadd.vector.value import SteeringVector

    vectors = [SteeringVector.load(path) for path in (first, second)]
    report = compare_vectors(*vectors)
    report = {"first": _named(first, vectors[0]), "second": _named(second, vectors[1]), **report}
    click.echo(json.dumps(report, indent=2) if as_json else _table(report))


def _named(path: Path, vector) -> dict:
    return {"path": str(path), "backend": vector.extra.get("backend", "torch") if vector.source == "pyactadd" else None}


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(report: dict) -> str:
    a, b = report["first"], report["second"]
    lines = [f"{b['path']} ({b['backend'] or 'foreign'}) against {a['path']} ({a['backend'] or 'foreign'})", ""]
    lines.append(f"{'layer':>5}  {'row':>4}  {'cosine':>9}  {'|first|':>10}  {'|second|':>10}  {'ratio':>7}")
    for entry in report["layers"]:
        for row in entry["rows"]:
            lines.append(
                f"{entry['layer']:>5}  {row['row']:>4}  {_number(row['cosine'], 6):>9}  {row['norm_first']:>10.4g}  "
                f"{row['norm_second']:>10.4g}  {_number(row['norm_ratio'], 4):>7}"
            )
        lines.append(
            f"layer {entry['layer']}: min {_number(entry['min_cosine'], 6)}, mean {_number(entry['mean_cosine'], 6)}, "
            f"whole tensor {_number(entry['cosine'], 6)}"
        )
    lines.append(f"all layers: min {_number(report['min_cosine'], 6)}, mean {_number(report['mean_cosine'], 6)}")
    for key, which in (("only_in_first", "first"), ("only_in_second", "second")):
        if report[key]:
            lines.append(f"only in the {which} file: layer {', '.join(map(str, report[key]))}")
    lines.extend(report["notes"])
    return "\n".join(lines)
