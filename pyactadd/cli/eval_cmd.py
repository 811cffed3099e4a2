"""``pyactadd eval``: perplexity ratios and next-token shifts of a steering file, or what it does to
generated text (``--task sentiment|topic|words``), computed in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.display import progress_bar, render
from pyactadd.cli.params import (
    AlignType,
    SteerSpec,
    Text,
    apply_options,
    check_context_memory,
    gguf_model,
    load_text_set,
    model_option,
    text_set_option,
    threads_option,
)
from pyactadd.measure.evaluation import DEFAULT_OFF_SET, DEFAULT_ON_SET


class CoeffList(click.ParamType):
    """Comma-separated coefficients and ranges from:to:step (pyactadd.measure.sweep.parse_coeffs)."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        from pyactadd.errors import PyactaddError
        from pyactadd.measure.sweep import parse_coeffs

        try:
            return parse_coeffs(value)
        except PyactaddError as exc:
            self.fail(str(exc), param, ctx)


GENERATION_OPTIONS = {
    "prompts_file": click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Openings to complete, one a line. Default: the shipped set for the task (negative openings for "
                 "--to positive, positive ones for --to negative, neutral ones for topic and words)."),
    "limit": click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N openings."),
    "n": click.option("--n", "n", type=click.IntRange(1, 10000), default=None, help="Completions per opening. Default: 2."),
    "max_tokens": click.option("--max-tokens", type=click.IntRange(1, 4096), default=None, help="Tokens per completion. Default: 32."),
    "temperature": click.option("--temperature", type=click.FloatRange(0, 100), default=None, help="Sampling temperature (0: greedy). Default: 0.7."),
    "top_p": click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus sampling. Default: 0.95."),
    "seed": click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=None, help="Seed of the first completion; the others count up from it. Default: 0."),
    "parallel": click.option("--parallel", type=click.IntRange(1, 256), default=None, help="Sequences per llama_decode. Default: 16."),
    "direction": click.option("--to", "direction", type=click.Choice(["positive", "negative"]), default=None, help="Sentiment task: the direction that counts as success. Default: positive."),
    "classifier": click.option("--classifier", type=click.Path(path_type=Path), default=None,
                 help="Sentiment task: a local transformers sequence-classification model directory instead of VADER."),
    "targets": click.option("--targets", type=Text(), default=None,
                 help="topic/words: words that count as success, comma-separated or a file with one a line. "
                 "Default (topic): the shipped wedding words."),
}
"""Options of ``eval --task ...``, by parameter name; ``sweep --objective behaviour`` takes those it lacks."""

BEHAVIOUR_OPTIONS = list(GENERATION_OPTIONS.values()) + [
    click.option("--prompted-text", type=Text(), default=None,
                 help="What the prompted condition prepends. Default: the steering file's positive prompt."),
    click.option("--coeffs", type=CoeffList(), default=None,
                 help="Steered conditions at these coefficients (each multiplies every --steer coefficient), e.g. 1,2,4."),
    click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write the dose-response figure (success and disfluency against the coefficient) to this PNG."),
]

_PERPLEXITY_ONLY = ("on_file", "off_file", "prompt", "top", "fast")


_OPTIONS = [
    click.option(
        "-s",
        "--steer",
        "steer",
        type=SteerSpec(),
        multiple=True,
        required=True,
        help="Steering file, optionally with a coefficient that multiplies the file's own (weddings.gguf:2). Repeat to sum several.",
    ),
    text_set_option("on", DEFAULT_ON_SET, "On-target"),
    text_set_option("off", DEFAULT_OFF_SET, "Off-target"),
    click.option("--prompt", type=Text(), default=None, help="Prompt for the next-token table. Default: 'I went up to my friend and said'."),
    click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="Rows per next-token table."),
    click.option("--align", type=AlignType(), default=None, help="front or a position offset. Default: each file's own."),
    click.option(
        "--fast",
        is_flag=True,
        help="Pack many sentences into each llama_decode and score a quantized model through its float32 copy "
        "(what sweep does): faster, perplexities differ slightly from the file's own arithmetic.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables."),
    click.option(
        "--task",
        type=click.Choice(["perplexity", "sentiment", "topic", "words"]),
        default="perplexity",
        show_default=True,
        help="perplexity: ratios on --on/--off; sentiment, topic, words: generate completions unsteered, steered and "
        "prompted, and score them.",
    ),
    *BEHAVIOUR_OPTIONS,
    click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=1024, show_default=True, help="Longest sentence in tokens."),
    threads_option,
    model_option,
]


@main.command("eval")
@apply_options(_OPTIONS)
def eval_command(steer, on_file, off_file, prompt, top, align, fast, as_json, task, n_ctx, threads, model, **behaviour):
    """Measure a steering file the paper's way: perplexity ratios and next-token shifts, or
    (--task sentiment|topic|words) how often generated text does what the steering is for.

    Scores every sentence of an on-target set (ON) and an off-target set (OFF) on its own,
    without and with the steering, inside llama.cpp through the steering engine, and
    reports each set's perplexity and the ratio steered/unsteered (below 1: the text got
    more likely). The vector's anchor token, if it has one, is put before every sentence
    and is never scored. Then, for one prompt, shows the next tokens whose probability
    rises and falls most and the largest terms of KL(steered || unsteered).

    By default every sentence is its own llama_decode on the model file as is, so the
    unsteered numbers equal llama-cpp-python's own; --fast trades that for speed.

    With --task sentiment, topic or words: N completions of every opening (--prompts, or
    the shipped set for the task) unsteered, steered and prompted (the steering prompt
    prepended as plain text), with the same seeds; the success rate of each with a 95 %
    interval and paired permutation p-values, and the disfluency (perplexity of each
    completion under the unsteered model). Sentiment is classified by VADER (not the
    paper's RoBERTa) or --classifier DIR; topic counts the shipped wedding words or
    --targets. --coeffs draws a dose-response figure (--plot FILE).

    \b
    Examples:
      pyactadd extract -p " weddings" -n " " -l 16 --anchor bos -o weddings.gguf
      pyactadd eval --steer weddings.gguf:1
      pyactadd eval --steer weddings.gguf:2 --on mine.txt --off other.txt --json
      pyactadd eval --steer love.gguf:5 --task sentiment --to positive
      pyactadd eval --steer weddings.gguf --task topic --coeffs 1,2,4 --plot dose.png
    """
    if task != "perplexity":
        refuse_options(_PERPLEXITY_ONLY, f"--task {task}")
        _run_behaviour(task, behaviour, steer, align=align, as_json=as_json, n_ctx=n_ctx, threads=threads, model=model)
        return
    refuse_options(behaviour, "--task perplexity")
    from pyactadd.measure.evaluation import DEFAULT_PROMPT, make_scorer
    from pyactadd.measure.report import eval_payload, eval_report

    on_path, on = load_text_set(on_file, DEFAULT_ON_SET, "--on")
    off_path, off = load_text_set(off_file, DEFAULT_OFF_SET, "--off")
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty: give a non-empty text", param_hint="--prompt")
    model_path = gguf_model(model)
    check_context_memory(model_path, n_ctx)
    scorer = make_scorer(model_path, fast=fast, n_ctx=n_ctx, n_threads=threads)
    sets = {"on": (on, str(on_path)), "off": (off, str(off_path))}
    result = _evaluate_with_progress(scorer, [(vector, coeff) for _, vector, coeff in steer], sets, prompt, top, align)
    payload = eval_payload(result, model=model_path, scorer=scorer, fast=fast, steering=steer, align=align)
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    click.echo(render(eval_report(payload, scorer)))


def _evaluate_with_progress(scorer, vectors, sets: dict, prompt: str, top: int, align) -> dict:
    """``evaluate`` with a progress bar on stderr (one step per scored sequence)."""
    from tqdm import tqdm

    from pyactadd.measure.evaluation import evaluate

    (on, on_source), (off, off_source) = sets["on"], sets["off"]
    bar = tqdm(total=2 * (len(on) + len(off)) + 2, desc="eval", unit="seq", leave=False, disable=None)
    scorer.on_batch = bar.update
    try:
        return evaluate(
            vectors,
            on,
            off,
            prompt=prompt,
            top=top,
            align=align,
            scorer=scorer,
            on_source=on_source,
            off_source=off_source,
            on_step=lambda step: bar.set_description(f"eval {step}"),
        )
    finally:
        bar.close()
        scorer.on_batch = None



def refuse_options(names, where: str) -> None:
    """Options given on the command line that do nothing ``where`` are refused (not silently ignored)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{param.opts[-1]} does nothing with {where}")


def behaviour_task(task: str, options: dict):
    """The scoring task and the openings (file, lines) for ``task``, read and checked before any model loads."""
    from pyactadd.errors import PyactaddError
    from pyactadd.measure.evaluation import text_set
    from pyactadd.measure.scoring import make_task, parse_targets

    try:
        targets = parse_targets(options["targets"]) if options["targets"] is not None else None
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint="--targets") from None
    if options["classifier"] is not None and task != "sentiment":
        raise click.UsageError("--classifier applies to --task sentiment only")
    if options["direction"] is not None and task != "sentiment":
        raise click.UsageError("--to applies to --task sentiment only")
    try:
        scoring = make_task(task, direction=options["direction"] or "positive", targets=targets, classifier=options["classifier"])
    except PyactaddError as exc:
        hint = "--classifier" if options["classifier"] is not None and task == "sentiment" else "--targets"
        raise click.BadParameter(str(exc), param_hint=hint) from None
    try:
        path, openings = text_set(options["prompts_file"], scoring.default_openings, what="--prompts file")
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompts") from None
    return scoring, path, openings[: options["limit"]] if options["limit"] else openings


def generation_settings(options: dict):
    """The :class:`~pyactadd.runtime.generate.Sampling` and (n, parallel) of the generation options, defaults filled in."""
    from pyactadd.measure import behaviour as b
    from pyactadd.runtime.generate import Sampling

    sampling = Sampling(
        max_tokens=options["max_tokens"] or b.DEFAULT_MAX_TOKENS,
        temperature=b.DEFAULT_TEMPERATURE if options["temperature"] is None else options["temperature"],
        top_p=0.95 if options["top_p"] is None else options["top_p"],
        seed=options["seed"] or 0,
    )
    return sampling, options["n"] or b.DEFAULT_N, options["parallel"] or b.DEFAULT_PARALLEL


def _run_behaviour(task: str, options: dict, steer, *, align, as_json: bool, n_ctx: int, threads, model) -> None:
    """``eval --task sentiment|topic|words``: generate, score, print the table or the JSON, draw --plot."""
    from pyactadd.errors import PyactaddError
    from pyactadd.measure.behaviour import evaluate_behaviour, prompted_prefix
    from pyactadd.measure.perplexity import BatchScorer, scoring_model
    from pyactadd.measure.report import behaviour_report, behaviour_settings
    from pyactadd.runtime.generate import load_llama

    scoring, path, openings = behaviour_task(task, options)
    sampling, n, parallel = generation_settings(options)
    if options["plot_file"] is not None and options["plot_file"].suffix.lower() != ".png":
        raise click.BadParameter(f"{options['plot_file']} should end in .png", param_hint="--plot")
    vectors = [(vector, coeff) for _, vector, coeff in steer]
    try:
        prefix = prompted_prefix(vectors, options["prompted_text"])
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompted-text") from None
    model_path = gguf_model(model)
    check_context_memory(model_path, n_ctx)
    llama = load_llama(model_path, n_threads=threads)
    # Disfluency scores every completion token: the float32 copy halves that time on the CPU.
    scorer = BatchScorer(scoring_model(model_path, "auto"), n_ctx=n_ctx, n_threads=threads)
    with progress_bar("generate") as progress:
        result = evaluate_behaviour(
            llama, scorer, openings, vectors, scoring, coeffs=options["coeffs"] or (1.0,), n=n, sampling=sampling,
            parallel=parallel, align=align, prompted_text=prefix, progress=progress,
        )
    payload = {**behaviour_settings(model=model_path, openings_file=str(path), steering=steer, align=align), **result.as_dict()}
    if options["plot_file"] is not None:
        from pyactadd.measure.plots import plot_dose_response

        plot_dose_response(payload, options["plot_file"])
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        click.echo(render(behaviour_report(payload)))
    if options["plot_file"] is not None:
        click.echo(f"Wrote {options['plot_file']}", err=True)

