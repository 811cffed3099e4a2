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
        "steering": [
            {
                "file": path,
                "coeff": coeff,
                "layers": vector.layer_ids,
                "positions": vector.n_positions,
                "alignment": align or vector.alignment,
            }
            for path, vector, coeff in steering
        ],
        **result,
    }


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
