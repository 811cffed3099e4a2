"""``pyactadd sweep``: a layer x coefficient grid scored in llama.cpp, and a recommended cell."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.display import render
from pyactadd.cli.params import Text, apply_options, check_context_memory, gguf_model, load_text_set, model_option, text_set_option, threads_option
from pyactadd.cli.eval_cmd import GENERATION_OPTIONS
from pyactadd.measure.evaluation import DEFAULT_OFF_SET, DEFAULT_ON_SET

_BEHAVIOUR_ONLY_GENERATION = ("limit", "n", "max_tokens", "temperature", "top_p", "parallel", "direction", "classifier")
"""eval's generation options that sweep lacks (it has --prompts, --targets and --seed of its own, reused)."""

_BEHAVIOUR_ONLY = ("task", "max_disfluency", "prompted_text") + _BEHAVIOUR_ONLY_GENERATION
_PERPLEXITY_ONLY = ("on_file", "off_file", "budget", "score_positions", "no_holdout", "no_prune")


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

    parse_layers(text, None)  # syntax only; the model's range is checked once it is known
    return text


_OPTIONS = [
    click.option("-p", "--positive", type=Text(), default=None, help="The prompt to steer towards, e.g. ' weddings'."),
    click.option("-n", "--negative", type=Text(), default=None, help="The prompt to steer away from, e.g. ' '."),
    click.option(
        "--vector",
        "vector_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Sweep an existing steering file's layers instead of a prompt pair.",
    ),
    text_set_option("on", DEFAULT_ON_SET, "On-target"),
    text_set_option("off", DEFAULT_OFF_SET, "Off-target"),
    click.option(
        "--layers",
        type=_Parsed("SPEC", _check_layer_syntax),
        default=None,
        help="Layers: numbers and inclusive ranges, e.g. 1-29, 2,4,8, 2:29:3, 8-20:4. Default: every valid layer.",
    ),
    click.option(
        "--coeffs",
        type=_Parsed("LIST", _coeffs),
        default="0.125,0.25,0.5,1,2,4",
        show_default=True,
        help="Coefficients: numbers and inclusive ranges from:to:step.",
    ),
    click.option(
        "--budget",
        type=_Parsed("PCT", _budget),
        default="5",
        show_default=True,
        help="Largest allowed rise of off-target perplexity, in percent.",
    ),
    click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("pyactadd-sweep"), show_default=True, help="Directory for sweep.json, sweep.csv and sweep.png."),
    click.option("--write", "write_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Save the recommended vector (one layer, coefficient baked in) to this GGUF file."),
    click.option(
        "--anchor",
        type=Text(),
        default="auto",
        show_default=True,
        help="Token before both prompts and every scored sentence: auto (BOS if the model adds it, else its end-of-text token, "
        "<|endoftext|> on SmolLM2), none, bos or a token.",
    ),
    click.option("--pad", type=Text(), default=" ", show_default="' '", help="Single-token text that right-pads the shorter prompt."),
    click.option("--keep-outliers", is_flag=True, help="Keep rows that sit on attention sinks (default: zero them)."),
    click.option("--targets", type=Text(), default=None, help="Comma-separated words for the steering score (default: picked from the on-target text); "
                 "with --objective behaviour, the words that count as success (or a file, one a line)."),
    click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Prompts for the steering score, one a line (default: six neutral prompts); "
                 "with --objective behaviour, the openings to complete (default: the shipped set for --task)."),
    click.option("--score-positions", type=click.IntRange(1, 256), default=8, show_default=True, help="Generated positions the steering score averages over."),
    click.option("--controls", type=click.IntRange(0, 100), default=3, show_default=True, help="Norm-matched random vectors evaluated at the recommended cell."),
    click.option("--no-holdout", is_flag=True, help="Choose on all sentences instead of the even lines (no held-out check)."),
    click.option("--no-prune", is_flag=True, help="Evaluate every cell; by default a layer's larger coefficients are skipped once one leaves the budget."),
    click.option(
        "--compute",
        type=click.Choice(["auto", "f32", "model"]),
        default="auto",
        show_default=True,
        help="auto/f32: score a quantized model through its float32 copy (same weights, faster); model: the file as is.",
    ),
    click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Seed of the random controls."),
    click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout (the tables go to stderr)."),
    click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=1024, show_default=True, help="Longest sentence in tokens."),
    click.option(
        "--objective",
        type=click.Choice(["perplexity", "behaviour"]),
        default="perplexity",
        show_default=True,
        help="perplexity: on/off-target perplexity ratios (above); behaviour: success rate of generated completions "
        "(--task) under a disfluency budget (--max-disfluency), chosen on half the openings (--prompts) and checked on the other half.",
    ),
    click.option("--task", type=click.Choice(["sentiment", "topic", "words"]), default=None, help="With --objective behaviour: what counts as success. Default: topic."),
    click.option("--max-disfluency", type=click.FloatRange(1.0), default=None,
                 help="With --objective behaviour: largest mean disfluency as a ratio to the unsteered one. Default: 1.5."),
    *[GENERATION_OPTIONS[name] for name in _BEHAVIOUR_ONLY_GENERATION],
    click.option("--prompted-text", type=Text(), default=None, help="With --objective behaviour: what the prompted baseline prepends. Default: the positive prompt."),
    threads_option,
    model_option,
]


@main.command("sweep")
@apply_options(_OPTIONS)
def sweep_command(
    positive, negative, vector_file, on_file, off_file, layers, coeffs, budget, out_dir, write_file, anchor, pad,
    keep_outliers, targets, prompts_file, score_positions, controls, no_holdout, no_prune, compute, seed, as_json,
    n_ctx, threads, model, objective, **behaviour,
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

    With --objective behaviour every cell generates completions of the even lines of
    --prompts (default: the shipped openings for --task) and the cell with the highest
    success rate whose mean disfluency is within --max-disfluency x unsteered is chosen;
    the odd lines check it beside unsteered, prompted and norm-matched random vectors.
    Writes sweep.json.

    \b
    Examples:
      pyactadd sweep -p " weddings" -n " "
      pyactadd sweep -p " weddings" -n " " --layers 8-20:4 --coeffs 0.5,1,2 --out sw
      pyactadd sweep --vector love.gguf --on kind.txt --off neutral.txt --write best.gguf
      pyactadd sweep -p " weddings" -n " " --objective behaviour --task topic --layers 6,12 --coeffs 2,4,8
    """
    from pyactadd.cli.eval_cmd import refuse_options

    if objective == "behaviour":
        _behaviour_sweep(click.get_current_context().params)
        return
    refuse_options(_BEHAVIOUR_ONLY, "--objective perplexity")
    from pyactadd.measure.perplexity import BatchScorer, scoring_model
    from pyactadd.measure.sweep import sweep_base, sweep_info, targets_from_words

    # Everything cheap is checked before a model loads.
    _check_choice(positive, negative, vector_file, write_file)
    on_path, on = load_text_set(on_file, DEFAULT_ON_SET, "--on")
    off_path, off = load_text_set(off_file, DEFAULT_OFF_SET, "--off")
    prompts = _read_prompts(prompts_file)
    words = _target_words(targets)
    model_path = gguf_model(model)
    check_context_memory(model_path, n_ctx)

    def extracting(chosen: list[int]) -> None:
        click.echo(f"Extracting {positive!r} - {negative!r} at {len(chosen)} layers in one forward pass per prompt", err=True)

    base, chosen_layers = sweep_base(
        model_path, vector_file=vector_file, positive=positive, negative=negative, layers=layers, anchor=anchor, pad=pad,
        zero_outliers=not keep_outliers, on_extract=extracting,
    )
    scored_with = scoring_model(model_path, compute)
    scorer = BatchScorer(scored_with, n_ctx=n_ctx, n_threads=threads)
    settings = {
        "layers": chosen_layers, "coeffs": coeffs, "budget": budget, "holdout": not no_holdout,
        "targets": targets_from_words(scorer, words) if words else None, "score_positions": score_positions,
        "n_controls": controls, "seed": seed, "prune": not no_prune, "out_dir": out_dir,
        "info": sweep_info(base, model=model_path, scored_with=scored_with, on_file=on_path, off_file=off_path, vector_file=vector_file),
        "sources": (str(on_path), str(off_path)),
        **({"prompts": prompts} if prompts else {}),
    }
    result = _sweep_with_progress(base, on, off, scorer, settings)
    _report(result, scorer, out_dir, as_json=as_json, write_file=write_file)


def _check_choice(positive, negative, vector_file, write_file) -> None:
    """A prompt pair or a file, not both; no empty prompt; a .gguf name for --write."""
    if vector_file is None and (positive is None or negative is None):
        raise click.UsageError("give --positive and --negative, or --vector FILE")
    if vector_file is not None and (positive is not None or negative is not None):
        raise click.UsageError("give either --positive/--negative or --vector, not both")
    for name, text in (("--positive", positive), ("--negative", negative)):
        if text is not None and not text:
            raise click.BadParameter("empty prompt: give a non-empty text", param_hint=name)
    if write_file is not None and write_file.suffix.lower() != ".gguf":
        raise click.BadParameter(f"{write_file} should end in .gguf", param_hint="--write")


def _read_prompts(prompts_file: Path | None) -> list[str] | None:
    from pyactadd.errors import InputError
    from pyactadd.prompts.files import read_sentences

    if prompts_file is None:
        return None
    try:
        return read_sentences(prompts_file, what="--prompts file")
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompts") from None


def _target_words(targets: str | None) -> list[str] | None:
    if targets is None:
        return None
    words = [w for w in targets.split(",") if w.strip()]
    if not words:
        raise click.BadParameter("no words: give comma-separated words such as 'wedding,bride'", param_hint="--targets")
    return words


def _sweep_with_progress(base, on, off, scorer, settings: dict):
    """``run_sweep`` with a progress bar on stderr that shows the best cell so far."""
    from tqdm import tqdm

    from pyactadd.measure.sweep import run_sweep

    bar = tqdm(total=len(settings["layers"]) * len(settings["coeffs"]), desc="sweep", unit="cell", disable=None)

    def on_cell(cell, result) -> None:
        bar.update(1)
        best = result.best_so_far()
        if best is not None:
            bar.set_postfix_str(f"best L={best.layer} c={best.coeff:g} on {best.on_ratio:.3f} off {best.off_ratio:.3f}")

    try:
        return run_sweep(base, on, off, scorer=scorer, on_cell=on_cell, **settings)
    finally:
        bar.close()


def _report(result, scorer, out_dir: Path, *, as_json: bool, write_file: Path | None) -> None:
    """The figure, the summary (stderr with --json), the JSON, then exit 130 if interrupted or write --write."""
    from pyactadd.measure.report import sweep_summary
    from pyactadd.measure.sweep import CSV_NAME, JSON_NAME, PNG_NAME

    payload = result.as_dict()
    png = out_dir / PNG_NAME
    try:
        from pyactadd.measure.plots import plot_sweep

        plot_sweep(payload, png)
    except ImportError as exc:
        click.secho(f"Warning: no figure ({exc}): pip install matplotlib", fg="yellow", err=True)
        png = None
    written = [out_dir / JSON_NAME, out_dir / CSV_NAME] + ([png] if png else [])
    click.echo(render(sweep_summary(payload, scorer)) + "\n\nWrote " + ", ".join(str(p) for p in written), err=as_json)
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    if not result.complete:
        click.echo("Interrupted: the files hold the cells finished so far.", err=True)
        sys.exit(130)
    if write_file is not None:
        vector = result.recommended_vector()
        vector.save(write_file)
        click.echo(f"Wrote {write_file}: layer {vector.layer_ids[0]}, coeff {vector.coefficient:g}", err=True)


def _behaviour_sweep(settings: dict) -> None:
    """``sweep --objective behaviour`` (``settings``: every parameter of the command): generate and score
    every cell, choose, check on held-out openings, report."""
    from pyactadd.cli.display import progress_bar
    from pyactadd.cli.eval_cmd import behaviour_task, generation_settings, refuse_options
    from pyactadd.files import atomic_write_text
    from pyactadd.errors import InputError
    from pyactadd.measure.behaviour import prompted_prefix
    from pyactadd.measure.behaviour_sweep import DEFAULT_MAX_DISFLUENCY, chosen_vector, run_behaviour_sweep
    from pyactadd.measure.perplexity import BatchScorer, scoring_model
    from pyactadd.measure.report import behaviour_sweep_summary
    from pyactadd.measure.sweep import JSON_NAME, sweep_base
    from pyactadd.runtime.generate import load_llama

    refuse_options(_PERPLEXITY_ONLY, "--objective behaviour")
    positive, negative, vector_file = settings["positive"], settings["negative"], settings["vector_file"]
    _check_choice(positive, negative, vector_file, settings["write_file"])
    options = settings  # eval's option names: prompts_file, targets and seed are sweep's own, reused
    task, _, openings = behaviour_task(options["task"] or "topic", options)
    sampling, n, parallel = generation_settings(options)
    model_path = gguf_model(settings["model"])
    check_context_memory(model_path, settings["n_ctx"])
    base, layers = sweep_base(
        model_path, vector_file=vector_file, positive=positive, negative=negative, layers=settings["layers"],
        anchor=settings["anchor"], pad=settings["pad"], zero_outliers=not settings["keep_outliers"],
    )
    prefix = prompted_prefix([(base, 1.0)], options["prompted_text"])
    llama = load_llama(model_path, n_threads=settings["threads"])
    scorer = BatchScorer(scoring_model(model_path, settings["compute"]), n_ctx=settings["n_ctx"], n_threads=settings["threads"])
    with progress_bar("sweep") as progress:
        payload = run_behaviour_sweep(
            llama, scorer, base, openings, task, layers=layers, coeffs=settings["coeffs"], prefix=prefix,
            max_disfluency=options["max_disfluency"] or DEFAULT_MAX_DISFLUENCY, n=n, sampling=sampling, parallel=parallel,
            n_controls=settings["controls"], seed=options["seed"], progress=progress,
        )
    out_dir = settings["out_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / JSON_NAME, json.dumps(payload, indent=2, ensure_ascii=False) + "\n", error=InputError)
    click.echo(render(behaviour_sweep_summary(payload)) + f"\n\nWrote {out_dir / JSON_NAME}", err=settings["as_json"])
    if settings["as_json"]:
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    if settings["write_file"] is not None and payload["chosen"] is not None:
        vector = chosen_vector(base, payload["chosen"]["layer"], payload["chosen"]["coeff"])
        vector.save(settings["write_file"])
        click.echo(f"Wrote {settings['write_file']}: layer {vector.layer_ids[0]}, coeff {vector.coefficient:g}", err=True)
