"""``pyactadd run``: steered generation inside llama.cpp, optionally beside the unsteered text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.display import progress_bar, side_by_side
from pyactadd.cli.params import (
    AlignType,
    FiniteFloat,
    Text,
    apply_options,
    check_context_memory,
    gguf_model,
    model_option,
    placement_from,
    rpc_options,
    steer_option,
    threads_option,
)

_OPTIONS = [
    steer_option("love.gguf", note=", each at its own alignment"),
    click.option("--align", type=AlignType(), default=None, help="front, back, all or a position offset, for every file. Default: each file's own."),
    click.option("--max-tokens", type=click.IntRange(1, 100000), default=48, show_default=True),
    click.option("--temperature", type=FiniteFloat(), default=0.7, show_default=True, help="0 for greedy decoding."),
    click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=0.95, show_default=True),
    click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Same seed for both runs of --compare."),
    click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template."),
    click.option("--compare", is_flag=True, help="Also generate without steering and show both side by side."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object (prompt, settings, completions) instead of text."),
    click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True, help="Context length (per prompt with --prompts)."),
    click.option(
        "--prompts",
        "prompts_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="A text file of prompts, one per line, generated together in batches instead of PROMPT.",
    ),
    click.option("--parallel", type=click.IntRange(1, 256), default=8, show_default=True, help="With --prompts: sequences per llama_decode."),
    threads_option,
    model_option,
    rpc_options,
]


@main.command("run")
@click.argument("prompt", type=Text(), required=False)
@apply_options(_OPTIONS)
def run_command(
    prompt, steer, align, max_tokens, temperature, top_p, seed, chat, compare, as_json, n_ctx, prompts_file, parallel, threads, model, rpc,
    rpc_split, rpc_layers
):
    """Generate a completion of PROMPT with steering added inside llama.cpp.

    Each steering file's rows are added to the residual stream at the positions its
    alignment gives (front: row p at position p), in the layers it was made for; files
    with different alignments mix, and --align overrides them all.
    Without --json the steered text streams to the terminal.

    With --prompts FILE, every line of FILE is a prompt; they are generated together,
    --parallel sequences per llama_decode, each with the steering (and, with --compare,
    unsteered beside it), and printed in order.

    \b
    Examples:
      pyactadd run "I hate you because" --steer love.gguf:5 --compare
      pyactadd run "Tell me about your day" --chat --steer love.gguf --json
      pyactadd run "I hate you because" --steer love.gguf:5 --rpc 10.0.0.2:50052,10.0.0.3:50052
      pyactadd run --prompts openings.txt --steer love.gguf:5 --compare --parallel 8
    """
    from pyactadd.runtime.generate import Sampling, load_llama, run

    if temperature < 0:
        raise click.BadParameter("must be >= 0", param_hint="--temperature")
    prompts = _prompts(prompt, prompts_file)
    model_path = gguf_model(model)
    placement = placement_from(rpc, rpc_split, rpc_layers)
    if placement is None:  # with --rpc the cache lives on the workers
        check_context_memory(model_path, n_ctx * (parallel * (1 + compare) if prompts_file else 1))
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    llama = load_llama(model_path, n_ctx=n_ctx, n_threads=threads, placement=placement)
    if prompts_file is not None:
        return _run_many(llama, prompts, steer, sampling, align, chat, compare, parallel, as_json, model_path)
    stream = not as_json and not compare
    vectors = [(vector, coeff) for _, vector, coeff in steer]
    result = run(
        llama, prompt, vectors, sampling, align=align, chat=chat, compare=compare, on_text=_streamer(prompt) if stream else None
    )
    if as_json:
        settings = {**sampling.as_dict(), "chat": chat, "align": align, "n_ctx": llama.n_ctx(), "rpc": rpc}
        click.echo(json.dumps(_payload(prompt, result, model_path, settings, steer, align), ensure_ascii=False, indent=2))
    elif compare:
        label = " + ".join(f"{path}:{coeff:g}" for path, _, coeff in steer) or "no vector"
        click.secho(prompt, bold=True)
        click.echo(side_by_side("unsteered", result["unsteered"], f"steered ({label})", result["steered"]))
    else:
        click.echo()


def _prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompts to run: PROMPT, or the lines of --prompts (exactly one of them)."""
    if prompt is None and prompts_file is None:
        raise click.UsageError("Missing argument 'PROMPT' (or --prompts FILE)")
    if prompt is not None and prompts_file is not None:
        raise click.UsageError("give a PROMPT or --prompts FILE, not both")
    if prompts_file is None:
        if not prompt.strip():
            raise click.BadParameter("the prompt is empty: give a non-empty text", param_hint="PROMPT")
        return [prompt]
    from pyactadd.errors import PyactaddError
    from pyactadd.prompts.files import read_sentences

    try:
        return read_sentences(prompts_file, what="--prompts file")
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompts") from None


def _run_many(llama, prompts, steer, sampling, align, chat, compare, parallel, as_json, model_path) -> None:
    """``run --prompts``: every prompt in one continuous batch, printed in order."""
    from pyactadd.runtime.batch import run_prompts

    vectors = [(vector, coeff) for _, vector, coeff in steer]
    with progress_bar("generate") as progress:
        results = run_prompts(llama, prompts, vectors, sampling, align=align, chat=chat, compare=compare, parallel=parallel, progress=progress)
    if as_json:
        settings = {**sampling.as_dict(), "chat": chat, "align": align, "n_ctx": llama.n_ctx(), "parallel": parallel}
        payloads = [_payload(r["prompt"], r, model_path, settings, steer, align) for r in results]
        click.echo(json.dumps(payloads, ensure_ascii=False, indent=2))
        return
    label = " + ".join(f"{path}:{coeff:g}" for path, _, coeff in steer) or "no vector"
    for result in results:
        click.secho(result["prompt"], bold=True)
        if compare:
            click.echo(side_by_side("unsteered", result["unsteered"], f"steered ({label})", result["steered"]))
        else:
            click.echo(result["steered"])
        click.echo()


def _streamer(prompt: str):
    """An ``on_text`` that writes pieces to the terminal as they come."""
    started = []

    def on_text(piece: str) -> None:
        # The prompt is echoed only once text flows, so an error is never glued to it.
        if not started:
            click.secho(prompt, bold=True, nl=False)
            started.append(True)
        sys.stdout.write(piece)
        sys.stdout.flush()

    return on_text


def _payload(prompt: str, result: dict, model_path, settings: dict, steer, align) -> dict:
    """The --json output."""
    return {
        "prompt": prompt,
        "prompt_tokens": result["prompt_tokens"],
        "model": str(model_path),
        "settings": settings,
        "steering": [
            {"file": path, "coeff": coeff, "layers": vector.layer_ids, "positions": vector.n_positions, "alignment": align if align is not None else vector.alignment}
            for path, vector, coeff in steer
        ],
        "completions": {key: result[key] for key in ("unsteered", "steered") if key in result},
    }
