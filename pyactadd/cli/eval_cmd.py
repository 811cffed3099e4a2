"""``pyactadd eval``: perplexity ratios and next-token shifts of a steering file, computed in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pyactadd.cli import main
from pyactadd.cli.params import AlignType, SteerSpec, model_option

_DEFAULT_ON, _DEFAULT_OFF = "weddings.txt", "shipping.txt"


def text_set_option(name: str, default: str, what: str):
    """``--on FILE`` / ``--off FILE``: a UTF-8 text file with one sentence a line (default: a shipped set)."""
    return click.option(
        f"--{name}",
        f"{name}_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"{what} sentences, one a line (UTF-8). Default: the shipped {default}.",
    )


def load_text_set(path: Path | None, default: str, option: str) -> tuple[Path, list[str]]:
    """Read a sentence set before any model loads; errors name the option."""
    from pyactadd.errors import PyactaddError
    from pyactadd.measure.evaluation import shipped_text
    from pyactadd.measure.perplexity import read_sentences

    path = path if path is not None else shipped_text(default)
    try:
        return path, read_sentences(path, what=f"{option} file")
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@main.command("eval")
@click.option(
    "-s",
    "--steer",
    "steer",
    type=SteerSpec(),
    multiple=True,
    required=True,
    help="Steering file, optionally with a coefficient that multiplies the file's own (weddings.gguf:2). Repeat to sum several.",
)
@text_set_option("on", _DEFAULT_ON, "On-target")
@text_set_option("off", _DEFAULT_OFF, "Off-target")
@click.option("--prompt", default=None, help="Prompt for the next-token table. Default: 'I went up to my friend and said'.")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="Rows per next-token table.")
@click.option("--align", type=AlignType(), default=None, help="front or a position offset. Default: each file's own.")
@click.option(
    "--fast",
    is_flag=True,
    help="Pack many sentences into each llama_decode and score a quantized model through its float32 copy "
    "(what sweep does): ~5x faster, perplexities differ slightly from the file's own arithmetic.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--n-ctx", type=click.IntRange(16, 1 << 20), default=1024, show_default=True, help="Longest sentence in tokens.")
@click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads (default: all cores, at most 8).")
@model_option
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
    from tqdm import tqdm

    from pyactadd.default_model import resolve_model
    from pyactadd.measure.evaluation import DEFAULT_PROMPT, evaluate, make_scorer

    on_path, on = load_text_set(on_file, _DEFAULT_ON, "--on")
    off_path, off = load_text_set(off_file, _DEFAULT_OFF, "--off")
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty: give a non-empty text", param_hint="--prompt")
    model_path = resolve_model(model)
    if not model_path.is_file():
        raise click.BadParameter(f"{model_path} is not a GGUF file (llama.cpp runs GGUF models)", param_hint="--model")
    vectors = [(vector, coeff) for _, vector, coeff in steer]
    scorer = make_scorer(model_path, fast=fast, n_ctx=n_ctx, n_threads=threads)
    bar = tqdm(total=2 * (len(on) + len(off)) + 2, desc="eval", unit="seq", leave=False, disable=None)
    scorer.on_batch = bar.update
    try:
        result = evaluate(
            vectors,
            on,
            off,
            prompt=prompt,
            top=top,
            align=align,
            scorer=scorer,
            on_source=str(on_path),
            off_source=str(off_path),
            on_step=lambda step: bar.set_description(f"eval {step}"),
        )
    finally:
        bar.close()
        scorer.on_batch = None
    payload = {
        "model": str(model_path),
        "scored_with": str(scorer.model_path),
        "mode": "fast" if fast else "exact",
        "steering": [
            {"file": path, "coeff": coeff, "layers": vector.layer_ids, "positions": vector.n_positions, "alignment": align or vector.alignment}
            for path, vector, coeff in steer
        ],
        **result,
    }
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    click.echo(format_report(payload, scorer))


def _token(text: str) -> str:
    return repr(text)


def format_report(payload: dict, scorer) -> str:
    """The human-readable tables of ``pyactadd eval``."""
    anchor_id = payload.get("anchor_id")
    anchor = "none" if anchor_id is None else f"{scorer.llama.detokenize([anchor_id], special=True).decode('utf-8', 'replace')!r} (id {anchor_id})"
    label = " + ".join(f"{Path(s['file']).name}:{s['coeff']:g}" for s in payload["steering"])
    lines = [
        f"Perplexity, sentence by sentence ({Path(payload['model']).name}, {payload['mode']}; steering {label}; anchor {anchor})",
        "",
    ]
    rows = [("set", "file", "sentences", "tokens", "unsteered", "steered", "ratio")]
    for name in ("on", "off"):
        s = payload[name]
        rows.append(
            (name, s["file"], str(s["n_sentences"]), str(s["n_tokens"]), f"{s['ppl_unsteered']:.2f}", f"{s['ppl_steered']:.2f}", f"{s['ratio']:.4f}")
        )
    lines += _table(rows, right={2, 3, 4, 5, 6})
    nt = payload.get("next_token")
    if nt:
        lines += ["", f"Next token after {nt['prompt']!r}: KL(steered || unsteered) = {nt['kl']:.4f} nats", ""]
        for title, key, last in (
            ("rises most", "rises", ("change", "delta", "{:+.4f}")),
            ("falls most", "falls", ("change", "delta", "{:+.4f}")),
            ("largest KL terms", "kl_contributors", ("p_s log(p_s/p_u)", "kl_term", "{:.4f}")),
        ):
            rows = [(title, "p unsteered", "p steered", last[0])]
            for e in nt[key]:
                rows.append((_token(e["token"]), f"{e['p_unsteered']:.4f}", f"{e['p_steered']:.4f}", last[2].format(e[last[1]])))
            if len(rows) == 1:
                rows.append(("(none)", "", "", ""))
            lines += _table(rows, right={1, 2, 3}) + [""]
    return "\n".join(lines).rstrip()


def _table(rows, right=frozenset()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
