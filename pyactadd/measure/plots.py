"""The sweep figure: perplexity-ratio curves per layer and a layer x coefficient heat map.

matplotlib is imported here only, with the non-interactive Agg backend, so the rest of
pyactadd (and ``pyactadd --help``) never pays for it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


_Y_CLIP = 1.6
"""Upper limit of the ratio curves' axis when some cell is far worse (the heat map shows the value)."""


def plot_sweep(result: dict, path: str | os.PathLike[str]) -> Path:
    """Draw a sweep's cells (the dict ``sweep.json`` holds) into a PNG at ``path``.

    Left: on-target and off-target perplexity ratio against the coefficient, one line per
    layer (colour = layer), with the off-target budget. Right: the on-target ratio as a
    layer x coefficient heat map; x marks cells over the off-target budget, grey cells
    were skipped or not reached, a star marks the recommended cell.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib import colors, ticker

    cells = result.get("cells", [])
    budget = float(result.get("budget", 0.05))
    layers = sorted({c["layer"] for c in cells})
    coeffs = sorted({c["coeff"] for c in cells})
    done = [c for c in cells if c.get("status") == "ok"]
    on = np.full((len(layers), len(coeffs)), np.nan)
    off = np.full_like(on, np.nan)
    for c in done:
        i, j = layers.index(c["layer"]), coeffs.index(c["coeff"])
        on[i, j], off[i, j] = c["on_ratio"], c["off_ratio"]

    figure = plt.figure(figsize=(15, max(5.0, 0.28 * len(layers) + 2.5)), layout="constrained")
    grid = figure.add_gridspec(2, 2, width_ratios=[1.2, 1])
    ax_on, ax_off = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[1, 0])
    ax_map = figure.add_subplot(grid[:, 1])
    cmap = plt.get_cmap("viridis")
    norm = colors.Normalize(vmin=min(layers, default=0), vmax=max(max(layers, default=1), min(layers, default=0) + 1))
    log_x = bool(coeffs) and all(c > 0 for c in coeffs)
    for i, layer in enumerate(layers):
        for ax, values in ((ax_on, on), (ax_off, off)):
            mask = ~np.isnan(values[i])
            if mask.any():
                ax.plot(np.array(coeffs)[mask], values[i][mask], "o-", ms=3, lw=1.2, color=cmap(norm(layer)))
    for ax, values, title in (
        (ax_on, on, "on-target perplexity ratio (steered / unsteered)"),
        (ax_off, off, "off-target perplexity ratio"),
    ):
        ax.axhline(1.0, color="black", lw=0.8)
        finite_values = values[~np.isnan(values)]
        if finite_values.size and finite_values.max() > _Y_CLIP:
            # One broken layer (ratio 3) would flatten every other curve: clip the axis.
            low = min(float(finite_values.min()), 1.0 - budget)
            ax.set_ylim(low - 0.03, _Y_CLIP)
            title += f" (axis clipped at {_Y_CLIP:g})"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ratio")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(ticker.FixedLocator(coeffs))
            ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{c:g}" for c in coeffs]))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_xlim(min(coeffs) / 1.2, max(coeffs) * 1.2)
        elif coeffs:
            pad = 0.05 * (max(coeffs) - min(coeffs) or 1.0)
            ax.set_xlim(min(coeffs) - pad, max(coeffs) + pad)
        ax.grid(alpha=0.3)
    ax_off.axhline(1.0 + budget, color="crimson", ls="--", lw=1, label=f"budget +{budget:.0%}")
    ax_off.legend(loc="upper left", fontsize=8)
    ax_off.set_xlabel("coefficient")
    bar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[ax_on, ax_off], pad=0.01, aspect=40)
    bar.set_label("layer L")

    finite = on[~np.isnan(on)]
    # Symmetric in log around 1; saturating at 1.5x keeps a 5-10 % effect visible next to a broken cell.
    spread = float(np.max(np.abs(np.log(finite)))) if finite.size else 0.05
    spread = min(max(spread, math.log(1.05)), math.log(1.5))
    map_norm = colors.LogNorm(vmin=math.exp(-spread), vmax=math.exp(spread), clip=True)
    cmap_map = plt.get_cmap("RdBu_r").with_extremes(bad="#d0d0d0")
    image = ax_map.imshow(np.ma.masked_invalid(on), cmap=cmap_map, norm=map_norm, aspect="auto", origin="lower")
    ax_map.set_xticks(range(len(coeffs)), [f"{c:g}" for c in coeffs])
    ax_map.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax_map.set_xlabel("coefficient")
    ax_map.set_ylabel("layer L")
    ax_map.set_title(f"on-target ratio (x: off-target over +{budget:.0%}, grey: skipped)", fontsize=10)
    annotate = len(layers) * len(coeffs) <= 200
    for i in range(len(layers)):
        for j in range(len(coeffs)):
            if np.isnan(on[i, j]):
                continue
            over = off[i, j] > 1.0 + budget
            if over:
                ax_map.text(j, i, "×", ha="center", va="center", fontsize=14, color="black", alpha=0.55)
            if annotate:
                red, green, blue, _ = cmap_map(map_norm(on[i, j]))
                ink = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.45 else "black"
                ax_map.text(j, i + (0.28 if over else 0), f"{on[i, j]:.2f}", ha="center", va="center", fontsize=6.5, color=ink)
    recommended = result.get("recommended")
    if recommended and recommended["layer"] in layers and recommended["coeff"] in coeffs:
        ax_map.plot(
            coeffs.index(recommended["coeff"]) + 0.32, layers.index(recommended["layer"]) + 0.25, marker="*", ms=13,
            mec="black", mfc="gold",
        )
    map_bar = figure.colorbar(image, ax=ax_map, pad=0.01, label="on-target ratio", extend="both")
    map_bar.ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2f"))
    map_bar.ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2f"))
    title = "pyactadd sweep"
    vector = result.get("vector") or {}
    if vector.get("positive") is not None:
        title += f": {vector['positive']!r} − {vector['negative']!r}"
    if recommended:
        title += f"; recommended L={recommended['layer']}, c={recommended['coeff']:g}"
    if not result.get("complete", True):
        title += " (interrupted)"
    figure.suptitle(title)
    out = Path(path)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
