"""What ``pyactadd eval`` and ``pyactadd sweep`` report: the JSON payload and the closing summary.

A summary is a list of blocks: a ``str`` is one line, a :class:`Table` is rows of cells
that the terminal front end lays out (``pyactadd.cli.display.render``). The numbers and
the wording live here; the layout does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from pyactadd.measure.perplexity import BatchScorer
from pyactadd.vector.value import SteeringVector


@dataclass(frozen=True)
class Table:
    """Rows of text cells, the first one the header; ``right`` holds the right-aligned columns."""

    rows: list[tuple[str, ...]]
    right: frozenset[int] = frozenset()


Block = Union[str, Table]


def anchor_text(scorer: BatchScorer, anchor_id: int | None) -> str:
    """``'<|endoftext|>' (id 0)``, or ``none`` without an anchor."""
    return "none" if anchor_id is None else f"{scorer.detokenize([anchor_id])!r} (id {anchor_id})"


# ---------------------------------------------------------------- eval


def eval_payload(
    result: dict,
    *,
    model: str | os.PathLike[str],
    scorer: BatchScorer,
    fast: bool,
    steering: Sequence[tuple[str, SteeringVector, float]],
    align: object = None,
) -> dict:
    """The JSON object ``pyactadd eval --json`` prints: the settings, then :func:`~pyactadd.measure.evaluation.evaluate`'s result.

    ``steering`` holds ``(file, vector, coeff)`` as given on the command line.
    """
    return {
        "model": str(model),
        "scored_with": str(scorer.model_path),
        "mode": "fast" if fast else "exact",
        "steering": steering_entries(steering, align),
        **result,
    }


def steering_entries(steering: Sequence[tuple[str, SteeringVector, float]], align: object = None) -> list[dict]:
    """``(file, vector, coeff)`` items as the JSON records them: file, coefficient, layers, positions, alignment."""
    return [
        {"file": path, "coeff": coeff, "layers": vector.layer_ids, "positions": vector.n_positions, "alignment": align or vector.alignment}
        for path, vector, coeff in steering
    ]


def eval_report(payload: dict, scorer: BatchScorer) -> list[Block]:
    """The tables of ``pyactadd eval``: each set's perplexities and ratio, then the next-token shift."""
    label = " + ".join(f"{Path(s['file']).name}:{s['coeff']:g}" for s in payload["steering"])
    blocks: list[Block] = [
        f"Perplexity, sentence by sentence ({Path(payload['model']).name}, {payload['mode']}; steering {label}; "
        f"anchor {anchor_text(scorer, payload.get('anchor_id'))})",
        "",
    ]
    rows = [("set", "file", "sentences", "tokens", "unsteered", "steered", "ratio")]
    for name in ("on", "off"):
        s = payload[name]
        rows.append(
            (name, s["file"], str(s["n_sentences"]), str(s["n_tokens"]), f"{s['ppl_unsteered']:.2f}", f"{s['ppl_steered']:.2f}", f"{s['ratio']:.4f}")
        )
    blocks.append(Table(rows, frozenset({2, 3, 4, 5, 6})))
    nt = payload.get("next_token")
    if nt:
        blocks += ["", f"Next token after {nt['prompt']!r}: KL(steered || unsteered) = {nt['kl']:.4f} nats", ""]
        blocks += _next_token_tables(nt)
    return blocks


def _next_token_tables(nt: dict) -> list[Block]:
    blocks: list[Block] = []
    for title, key, (head, field, form) in (
        ("rises most", "rises", ("change", "delta", "{:+.4f}")),
        ("falls most", "falls", ("change", "delta", "{:+.4f}")),
        ("largest KL terms", "kl_contributors", ("p_s log(p_s/p_u)", "kl_term", "{:.4f}")),
    ):
        rows = [(title, "p unsteered", "p steered", head)]
        for e in nt[key]:
            rows.append((repr(e["token"]), f"{e['p_unsteered']:.4f}", f"{e['p_steered']:.4f}", form.format(e[field])))
        if len(rows) == 1:
            rows.append(("(none)", "", "", ""))
        blocks += [Table(rows, frozenset({1, 2, 3})), ""]
    return blocks


# ---------------------------------------------------------------- sweep


def sweep_summary(payload: dict, scorer: BatchScorer | None) -> list[Block]:
    """The sweep's closing report (``payload`` is ``SweepResult.as_dict()``): what was swept,
    the recommendation and its checks, the best cells within the budget.

    ``scorer`` names the anchor token; it may be None when the payload has no anchor.
    """
    done = [c for c in payload["cells"] if c["status"] == "ok"]
    blocks: list[Block] = _sweep_settings(payload, scorer) + [""]
    if payload.get("recommended") is None:
        blocks += _no_recommendation(payload, done)
    else:
        blocks += _recommendation(payload)
    within = sorted((c for c in done if c["within_budget"]), key=lambda c: c["on_ratio"])[:5]
    if within:
        blocks += ["", "Best cells within the budget (tuning sentences):"]
        rows = [("layer", "coeff", "on ratio", "off ratio", "score")]
        for c in within:
            rows.append((str(c["layer"]), f"{c['coeff']:g}", f"{c['on_ratio']:.4f}", f"{c['off_ratio']:.4f}", f"{c['score']:+.3f}"))
        blocks.append(Table(rows, frozenset({0, 1, 2, 3, 4})))
    return blocks


def _sweep_settings(payload: dict, scorer: BatchScorer | None) -> list[Block]:
    cells, budget, timing = payload["cells"], payload["budget"], payload.get("timing", {})
    n_layers, n_coeffs = len({c["layer"] for c in cells}), len({c["coeff"] for c in cells})
    per_cell, decode = timing.get("seconds_per_cell"), timing.get("decode_seconds_per_cell")
    lines = [
        f"Swept {n_layers} layers x {n_coeffs} coefficients: {sum(c['status'] == 'ok' for c in cells)} cells evaluated, "
        f"{timing.get('cells_skipped', 0)} skipped, in {timing.get('seconds', 0):.0f} s"
        + (f" ({per_cell:.1f} s per cell, {decode:.1f} s of it in llama_decode)" if per_cell else "")
    ]
    if payload.get("anchor_id") is not None:
        lines.append(f"Anchor {anchor_text(scorer, payload['anchor_id'])} before every sentence and prompt; it is never scored")
    zeroed = (payload.get("vector") or {}).get("zeroed_rows") or {}
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
    return lines


def _no_recommendation(payload: dict, done: list[dict]) -> list[Block]:
    budget = payload["budget"]
    lines: list[Block] = [f"No cell lowers on-target perplexity while keeping off-target perplexity within +{budget:.0%}."]
    helping = [c for c in done if c["on_ratio"] < 1]
    if helping:
        mildest = min(helping, key=lambda c: c["off_ratio"])
        smallest = min(abs(c["coeff"]) for c in payload["cells"])
        lines.append(
            f"The cells that lower it all raise off-target perplexity too (least: layer {mildest['layer']}, "
            f"coefficient {mildest['coeff']:g}, +{mildest['off_ratio'] - 1:.0%}): try smaller coefficients, "
            f"e.g. --coeffs {smallest / 4:g},{smallest / 2:g}, or a larger --budget."
        )
    return lines


def _recommendation(payload: dict) -> list[Block]:
    recommended = payload["recommended"]
    tag = "Recommended" if recommended.get("final") else "Best so far"
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
    return [f"{tag}: layer {recommended['layer']}, coefficient {recommended['coeff']:g}", Table(rows, frozenset({1, 2, 3}))]


# ---------------------------------------------------------------- eval --task sentiment|topic|words


def behaviour_report(payload: dict) -> list[Block]:
    """The table of a behavioural ``pyactadd eval`` in the paper's shape: condition x success x disfluency.

    ``payload`` is :meth:`~pyactadd.measure.behaviour.BehaviourResult.as_dict` plus the
    settings :func:`behaviour_settings` adds.
    """
    sampling = payload["sampling"]
    steering = " + ".join(f"{Path(s['file']).name}:{s['coeff']:g}" for s in payload.get("steering", []))
    blocks: list[Block] = [
        f"Task {payload['task']} ({payload['scorer']})",
        f"{payload['n_openings']} openings from {payload.get('openings_file', 'the prompt set')} x {payload['n_per_opening']} "
        f"completions, {sampling['max_tokens']} tokens, temperature {sampling['temperature']:g}, seed {sampling['seed']}; "
        f"steering {steering or '-'}; prompted: {payload['prompted_text']!r} prepended",
        "",
    ]
    blocks.append(condition_table(payload["conditions"]))
    timing = payload.get("timing", {})
    if timing:
        blocks += ["", f"Generated {timing.get('generated_tokens', 0)} tokens in {timing.get('generate', 0):.1f} s; scored in {timing.get('score', 0):.1f} s"]
    blocks += ["Disfluency: perplexity of each completion given its opening under the unsteered model (empty completions left out)."]
    return blocks


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def behaviour_settings(
    *, model: str | os.PathLike[str], openings_file: str, steering: Sequence[tuple[str, SteeringVector, float]], align: object = None
) -> dict:
    """The settings ``eval --task ... --json`` records before the result: model, openings file, steering files."""
    return {
        "model": str(model),
        "openings_file": openings_file,
        "steering": steering_entries(steering, align),
    }


def condition_table(conditions: Sequence[dict]) -> Table:
    """Condition x n x success (interval, p-values) x disfluency (mean with interval, median)."""
    rows = [("condition", "n", "success", "95% interval", "p vs unsteered", "p vs prompted", "disfluency mean [95%]", "median")]
    for c in conditions:
        name = c["condition"] if c["coeff"] is None else f"{c['condition']} x{c['coeff']:g}"
        s, d = c["success"], c["disfluency"]
        mean = f"{d['mean']['value']:.1f} [{d['mean']['low']:.1f}, {d['mean']['high']:.1f}]" if d["mean"] else "-"
        median = f"{d['median']['value']:.1f}" if d["median"] else "-"
        rows.append(
            (name, str(c["n"]), f"{s['value']:.3f}", f"{s['low']:.3f}-{s['high']:.3f}", _p(c["p_vs_unsteered"]), _p(c["p_vs_prompted"]), mean, median)
        )
    return Table(rows, frozenset({1, 2, 4, 5, 7}))


def behaviour_sweep_summary(payload: dict) -> list[Block]:
    """``sweep --objective behaviour``'s report: the grid, the chosen cell, and its held-out check."""
    cells, budget = payload["cells"], payload["max_disfluency"]
    split, base = payload["split"], payload["tune_unsteered"]
    blocks: list[Block] = [
        f"Swept {len({c['layer'] for c in cells})} layers x {len({c['coeff'] for c in cells})} coefficients by {payload['task']} success "
        f"({payload['scorer']}) in {payload['timing']['seconds']:.0f} s",
        f"Chosen on {split['n_tune']} openings x {split['n_per_opening']} (even lines), checked on {split['n_holdout']} held-out ones; "
        f"budget: mean disfluency at most {budget:g} x unsteered ({base['disfluency']:.1f}; unsteered success {base['success']:.3f})",
        "",
    ]
    rows = [("layer", "coeff", "success", "disfluency", "ratio", "within")]
    ranked = sorted(cells, key=lambda c: (not c["within_budget"], -c["success"], c["disfluency"]))
    for c in ranked[:8]:
        rows.append((str(c["layer"]), f"{c['coeff']:g}", f"{c['success']:.3f}", f"{c['disfluency']:.1f}", f"{c['disfluency_ratio']:.2f}", "yes" if c["within_budget"] else "no"))
    blocks += ["Best cells (tuning openings):", Table(rows, frozenset({0, 1, 2, 3, 4})), ""]
    chosen = payload["chosen"]
    if chosen is None:
        return blocks + [f"No cell keeps the mean disfluency within {budget:g} x unsteered: try smaller coefficients or a larger --max-disfluency."]
    blocks += [f"Chosen: layer {chosen['layer']}, coefficient {chosen['coeff']:g}. Held-out openings:", condition_table(payload["holdout"]["conditions"])]
    return blocks
