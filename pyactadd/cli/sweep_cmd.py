"""``pyactadd sweep``: a layer x coefficient grid scored in llama.cpp, and a recommended cell."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.eval_cmd import _DEFAULT_OFF, _DEFAULT_ON, _table, load_text_set, text_set_option
from pyactadd.cli.params import model_option


class _Parsed(click.ParamType):
    """A click type around one of pyactadd.measure.sweep's parsers (errors become BadParameter)."""

    def __init__(self, name: str, parser) -> None:
        self.name = name
        self._parser = parser

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        from pyactadd.errors import PyactaddError

        try:
            return self._parser(value)
        except PyactaddError as exc:
            self.fail(str(exc), param, ctx)


def _coeffs(text):
    from pyactadd.measure.sweep import parse_coeffs

    return parse_coeffs(text)


def _budget(text):
    from pyactadd.measure.sweep import parse_budget

    return parse_budget(text)


def _check_layer_syntax(text):
    from pyactadd.measure.sweep import parse_layers

    parse_layers(text, 1 << 30)  # syntax only; the range is checked once the model is known
    return text


@main.command("sweep")
@click.option("-p", "--positive", default=None, help="The prompt to steer towards, e.g. ' weddings'.")
@click.option("-n", "--negative", default=None, help="The prompt to steer away from, e.g. ' '.")
@click.option(
    "--vector",
    "vector_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Sweep an existing steering file's layers instead of a prompt pair.",
)
@text_set_option("on", _DEFAULT_ON, "On-target")
@text_set_option("off", _DEFAULT_OFF, "Off-target")
@click.option(
    "--layers",
    type=_Parsed("SPEC", _check_layer_syntax),
    default=None,
    help="Layers: numbers and inclusive ranges, e.g. 1-29, 2,4,8, 2:29:3, 8-20:4. Default: every valid layer.",
)
@click.option(
    "--coeffs",
    type=_Parsed("LIST", _coeffs),
    default="0.125,0.25,0.5,1,2,4",
    show_default=True,
    help="Coefficients: numbers and inclusive ranges from:to:step.",
)
@click.option(
    "--budget",
    type=_Parsed("PCT", _budget),
    default="5",
    show_default=True,
    help="Largest allowed rise of off-target perplexity, in percent.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("pyactadd-sweep"), show_default=True, help="Directory for sweep.json, sweep.csv and sweep.png.")
@click.option("--write", "write_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Save the recommended vector (one layer, coefficient baked in) to this GGUF file.")
@click.option(
    "--anchor",
    default="auto",
    show_default=True,
    help="Token before both prompts and every scored sentence: auto (BOS if the model adds it, else its end-of-text token, "
    "<|endoftext|> on SmolLM2), none, bos or a token.",
)
@click.option("--pad", default=" ", show_default="' '", help="Single-token text that right-pads the shorter prompt.")
@click.option("--keep-outliers", is_flag=True, help="Keep rows that sit on attention sinks (default: zero them).")
@click.option("--targets", default=None, help="Comma-separated words for the steering score (default: picked from the on-target text).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Prompts for the steering score, one a line (default: six neutral prompts).")
@click.option("--score-positions", type=click.IntRange(1, 256), default=8, show_default=True, help="Generated positions the steering score averages over.")
@click.option("--controls", type=click.IntRange(0, 100), default=3, show_default=True, help="Norm-matched random vectors evaluated at the recommended cell.")
@click.option("--no-holdout", is_flag=True, help="Choose on all sentences instead of the even lines (no held-out check).")
@click.option("--no-prune", is_flag=True, help="Evaluate every cell; by default a layer's larger coefficients are skipped once one leaves the budget.")
@click.option(
    "--compute",
    type=click.Choice(["auto", "f32", "model"]),
    default="auto",
    show_default=True,
    help="auto/f32: score a quantized model through its float32 copy (same weights, ~2.6x faster); model: the file as is.",
)
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Seed of the random controls.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout (the tables go to stderr).")
@click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=1024, show_default=True, help="Longest sentence in tokens.")
@click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads (default: all cores, at most 8).")
@model_option
def sweep_command(
    positive, negative, vector_file, on_file, off_file, layers, coeffs, budget, out_dir, write_file, anchor, pad,
    keep_outliers, targets, prompts_file, score_positions, controls, no_holdout, no_prune, compute, seed, as_json,
    n_ctx, threads, model,
):
    """Choose a layer and a coefficient: sweep a grid and recommend a cell.

    Extracts POSITIVE - NEGATIVE at every layer in one forward pass per prompt (or reads
    --vector FILE), then, for every layer x coefficient, scores in llama.cpp the
    perplexity ratio (steered / unsteered) of the on-target and off-target sentences and
    a steering score (log-probability gained by target words over the first generated
    positions of a few prompts). The recommendation is the largest on-target gain whose
    off-target perplexity rises by at most --budget; it is chosen on the even lines of
    the text sets, checked on the odd lines, and shown beside norm-matched random vectors.

    Writes sweep.json and sweep.csv after every cell (Ctrl-C keeps a valid partial
    result and prints the best cell so far) and sweep.png at the end.

    \b
    Examples:
      pyactadd sweep -p " weddings" -n " "
      pyactadd sweep -p " weddings" -n " " --layers 8-20:4 --coeffs 0.5,1,2 --out sw
      pyactadd sweep --vector love.gguf --on kind.txt --off neutral.txt --write best.gguf
    """
    from tqdm import tqdm

    from pyactadd.default_model import resolve_model
    from pyactadd.errors import InputError
    from pyactadd.measure.perplexity import BatchScorer, read_sentences, scoring_model
    from pyactadd.measure.sweep import parse_layers, run_sweep, sweep_vector, targets_from_words
    from pyactadd.prompts.tokens import fingerprint_of
    from pyactadd.vector.value import SteeringVector

    # Everything cheap is checked before a model loads.
    if vector_file is None and (positive is None or negative is None):
        raise click.UsageError("give --positive and --negative, or --vector FILE")
    if vector_file is not None and (positive is not None or negative is not None):
        raise click.UsageError("give either --positive/--negative or --vector, not both")
    for name, text in (("--positive", positive), ("--negative", negative)):
        if text is not None and not text:
            raise click.BadParameter("empty prompt: give a non-empty text", param_hint=name)
    if write_file is not None and write_file.suffix.lower() != ".gguf":
        raise click.BadParameter(f"{write_file} should end in .gguf", param_hint="--write")
    on_path, on = load_text_set(on_file, _DEFAULT_ON, "--on")
    off_path, off = load_text_set(off_file, _DEFAULT_OFF, "--off")
    prompts = None
    if prompts_file is not None:
        try:
            prompts = read_sentences(prompts_file, what="--prompts file")
        except InputError as exc:
            raise click.BadParameter(str(exc), param_hint="--prompts") from None
    words = None
    if targets is not None:
        words = [w for w in targets.split(",") if w.strip()]
        if not words:
            raise click.BadParameter("no words: give comma-separated words such as 'wedding,bride'", param_hint="--targets")
    model_path = resolve_model(model)
    if not model_path.is_file():
        raise click.BadParameter(f"{model_path} is not a GGUF file (llama.cpp runs GGUF models)", param_hint="--model")
    fingerprint = fingerprint_of(model_path)
    base = None
    if vector_file is not None:
        base = SteeringVector.load(vector_file)
        base.check_fits(fingerprint)
        chosen_layers = parse_layers(layers, fingerprint.n_layer) if layers else base.layer_ids
    else:
        chosen_layers = parse_layers(layers, fingerprint.n_layer)

    def note(text: str) -> None:
        click.echo(text, err=True)

    if base is None:
        note(f"Extracting {positive!r} - {negative!r} at {len(chosen_layers)} layers in one forward pass per prompt")
        base = sweep_vector(positive, negative, chosen_layers, model=model_path, anchor=anchor, pad=pad, zero_outliers=not keep_outliers)
    scored_with = scoring_model(model_path, compute)
    scorer = BatchScorer(scored_with, n_ctx=n_ctx, n_threads=threads)
    target_ids = targets_from_words(scorer, words) if words else None
    zeroed = json.loads(str(base.extra.get("zeroed_rows", "{}")))
    info = {
        "model": str(model_path),
        "scored_with": str(scored_with),
        "compute": "model" if scored_with == model_path else "f32",
        "on_file": str(on_path),
        "off_file": str(off_path),
        "vector": {
            "positive": base.positive,
            "negative": base.negative,
            "file": str(vector_file) if vector_file else None,
            "anchor": base.anchor,
            "anchor_id": base.anchor_id,
            "positive_ids": base.positive_ids,
            "negative_ids": base.negative_ids,
            "n_positions": base.n_positions,
            "zeroed_rows": zeroed,
            "row_norms": {str(layer): [round(float(x), 3) for x in norms] for layer, norms in base.row_norms().items()},
        },
    }
    kwargs = {"prompts": prompts} if prompts else {}
    n_cells = len(chosen_layers) * len(coeffs)
    bar = tqdm(total=n_cells, desc="sweep", unit="cell", disable=None)

    def on_cell(cell, result) -> None:
        bar.update(1)
        best = result.best_so_far()
        if best is not None:
            bar.set_postfix_str(f"best L={best.layer} c={best.coeff:g} on {best.on_ratio:.3f} off {best.off_ratio:.3f}")

    try:
        result = run_sweep(
            base,
            on,
            off,
            scorer=scorer,
            layers=chosen_layers,
            coeffs=coeffs,
            budget=budget,
            holdout=not no_holdout,
            targets=target_ids,
            score_positions=score_positions,
            n_controls=controls,
            seed=seed,
            prune=not no_prune,
            out_dir=out_dir,
            info=info,
            sources=(str(on_path), str(off_path)),
            on_cell=on_cell,
            **kwargs,
        )
    finally:
        bar.close()

    payload = result.as_dict()
    png = out_dir / "sweep.png"
    try:
        from pyactadd.measure.plots import plot_sweep

        plot_sweep(payload, png)
    except ImportError as exc:
        click.secho(f"Warning: no figure ({exc}): pip install matplotlib", fg="yellow", err=True)
        png = None
    report = format_summary(payload, scorer, out_dir, png)
    click.echo(report, err=as_json)
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    if not result.complete:
        click.echo("Interrupted: the files hold the cells finished so far.", err=True)
        sys.exit(130)
    if write_file is not None:
        vector = result.recommended_vector()
        vector.save(write_file)
        click.echo(f"Wrote {write_file}: layer {vector.layer_ids[0]}, coeff {vector.coefficient:g}", err=True)


def format_summary(payload: dict, scorer, out_dir: Path, png: Path | None) -> str:
    """The sweep's closing report: what was swept, the recommendation and its checks, the best cells."""
    cells = payload["cells"]
    budget = payload["budget"]
    timing = payload.get("timing", {})
    done = [c for c in cells if c["status"] == "ok"]
    layers = sorted({c["layer"] for c in cells})
    coeffs = sorted({c["coeff"] for c in cells})
    lines = []
    per_cell = timing.get("seconds_per_cell")
    decode = timing.get("decode_seconds_per_cell")
    lines.append(
        f"Swept {len(layers)} layers x {len(coeffs)} coefficients: {len(done)} cells evaluated, "
        f"{timing.get('cells_skipped', 0)} skipped, in {timing.get('seconds', 0):.0f} s"
        + (f" ({per_cell:.1f} s per cell, {decode:.1f} s of it in llama_decode)" if per_cell else "")
    )
    vector = payload.get("vector") or {}
    anchor_id = payload.get("anchor_id")
    if anchor_id is not None:
        text = scorer.llama.detokenize([anchor_id], special=True).decode("utf-8", "replace")
        lines.append(f"Anchor {text!r} (id {anchor_id}) before every sentence and prompt; it is never scored")
    zeroed = vector.get("zeroed_rows") or {}
    if zeroed:
        shown = ", ".join(f"L{layer}: {rows}" for layer, rows in sorted(zeroed.items(), key=lambda kv: int(kv[0])))
        lines.append(f"Rows zeroed as attention sinks: {shown}")
    split = payload.get("split", {})
    if split:
        held = f", checked on {split['n_on_holdout']} + {split['n_off_holdout']} held-out" if split.get("held_out") else ""
        lines.append(
            f"Chosen on {split['n_on_tune']} on-target + {split['n_off_tune']} off-target sentences{held}; "
            f"budget: off-target perplexity +{budget:.0%}"
        )
    lines.append("")
    recommended = payload.get("recommended")
    if recommended is None:
        lines.append(f"No cell lowers on-target perplexity while keeping off-target perplexity within +{budget:.0%}.")
        helping = [c for c in done if c["on_ratio"] < 1]
        if helping:
            mildest = min(helping, key=lambda c: c["off_ratio"])
            lines.append(
                f"The cells that lower it all raise off-target perplexity too (least: layer {mildest['layer']}, "
                f"coefficient {mildest['coeff']:g}, +{mildest['off_ratio'] - 1:.0%}): try smaller coefficients, "
                f"e.g. --coeffs {min(abs(c) for c in coeffs) / 4:g},{min(abs(c) for c in coeffs) / 2:g}, or a larger --budget."
            )
    else:
        tag = "Recommended" if recommended.get("final") else "Best so far"
        lines.append(f"{tag}: layer {recommended['layer']}, coefficient {recommended['coeff']:g}")
        rows = [("", "on-target ratio", "off-target ratio", "score (nats)")]
        t = recommended["tune"]
        rows.append(("chosen cell (tuning sentences)", f"{t['on_ratio']:.4f}", f"{t['off_ratio']:.4f}", f"{t['score']:+.3f}"))
        h = recommended.get("holdout")
        if h:
            rows.append(("held-out sentences", f"{h['on_ratio']:.4f}", f"{h['off_ratio']:.4f}", ""))
        control = payload.get("control")
        if control:
            rows.append(
                (
                    f"random control, same norms (mean of {control['n']}, {control['split']})",
                    f"{control['mean_on_ratio']:.4f}",
                    f"{control['mean_off_ratio']:.4f}",
                    f"{control['mean_score']:+.3f}",
                )
            )
        lines += _table(rows, right={1, 2, 3})
    within = sorted((c for c in done if c["within_budget"]), key=lambda c: c["on_ratio"])[:5]
    if within:
        lines += ["", "Best cells within the budget (tuning sentences):"]
        rows = [("layer", "coeff", "on ratio", "off ratio", "score")]
        for c in within:
            rows.append((str(c["layer"]), f"{c['coeff']:g}", f"{c['on_ratio']:.4f}", f"{c['off_ratio']:.4f}", f"{c['score']:+.3f}"))
        lines += _table(rows, right={0, 1, 2, 3, 4})
    written = [out_dir / "sweep.json", out_dir / "sweep.csv"] + ([png] if png else [])
    lines += ["", "Wrote " + ", ".join(str(p) for p in written)]
    return "\n".join(lines)
