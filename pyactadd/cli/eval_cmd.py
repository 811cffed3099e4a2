"""``pyactadd eval``: perplexity ratios and next-token shifts of a steering file, computed in llama.cpp."""

from __future__ import annotations

import json

import click

from pyactadd.cli import main
from pyactadd.cli.display import render
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
    click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=1024, show_default=True, help="Longest sentence in tokens."),
    threads_option,
    model_option,
]


@main.command("eval")
@apply_options(_OPTIONS)
def eval_command(steer, on_file, off_file, prompt, top, align, fast, as_json, n_ctx, threads, model):
    """Measure a steering file the paper's way: perplexity ratios and next-token shifts.

    Scores every sentence of an on-target set (ON) and an off-target set (OFF) on its own,
    without and with the steering, inside llama.cpp through the steering engine, and
    reports each set's perplexity and the ratio steered/unsteered (below 1: the text got
    more likely). The vector's anchor token, if it has one, is put before every sentence
    and is never scored. Then, for one prompt, shows the next tokens whose probability
    rises and falls most and the largest terms of KL(steered || unsteered).

    By default every sentence is its own llama_decode on the model file as is, so the
    unsteered numbers equal llama-cpp-python's own; --fast trades that for speed.

    \b
    Examples:
      pyactadd extract -p " weddings" -n " " -l 16 --anchor bos -o weddings.gguf
      pyactadd eval --steer weddings.gguf:1
      pyactadd eval --steer weddings.gguf:2 --on mine.txt --off other.txt --json
    """
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
