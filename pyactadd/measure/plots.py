"""The sweep figure: perplexity-ratio curves per layer and a layer x coefficient heat map.

matplotlib is imported here only, with the non-interactive Agg backend, so the rest of
pyactadd (and ``pyactadd --help``) never pays for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


_Y_CLIP = 1.6
"""Upper limit of the ratio curves' axis when some cell is far worse (the heat map shows the value)."""

RECOMMENDED_GID = "recommended"
"""``gid`` of the heat map's star on the recommended cell (so a reader of the figure can find it)."""


@dataclass(frozen=True)
class _Grid:
    """A sweep's cells as arrays: ``on[i, j]`` is layer ``layers[i]`` at ``coeffs[j]`` (NaN: not evaluated)."""

    layers: list[int]
    coeffs: list[float]
    on: np.ndarray
    off: np.ndarray
    budget: float

    @staticmethod
    def of(result: dict) -> "_Grid":
        cells = result.get("cells", [])
        layers = sorted({c["layer"] for c in cells})
        coeffs = sorted({c["coeff"] for c in cells})
        on = np.full((len(layers), len(coeffs)), np.nan)
        off = np.full_like(on, np.nan)
        for c in cells:
            if c.get("status") == "ok":
                i, j = layers.index(c["layer"]), coeffs.index(c["coeff"])
                on[i, j], off[i, j] = c["on_ratio"], c["off_ratio"]
        return _Grid(layers, coeffs, on, off, float(result.get("budget", 0.05)))

    def cell_of(self, recommended: dict | None) -> tuple[int, int] | None:
        """(row, column) of the recommended cell in the heat map, if it is on the grid."""
        if not recommended or recommended["layer"] not in self.layers or recommended["coeff"] not in self.coeffs:
            return None
        return self.layers.index(recommended["layer"]), self.coeffs.index(recommended["coeff"])


def plot_sweep(result: dict, path: str | os.PathLike[str]) -> Path:
    """Draw a sweep's cells (the dict ``sweep.json`` holds) into a PNG at ``path``; see :func:`sweep_figure`."""
    figure = sweep_figure(result)
    import matplotlib.pyplot as plt  # after sweep_figure chose the Agg backend

    out = Path(path)
    try:
        figure.savefig(out, dpi=110)
    finally:
        plt.close(figure)
    return out


def sweep_figure(result: dict):
    """The sweep figure of ``result`` (the dict ``sweep.json`` holds), a ``matplotlib.figure.Figure``.

    Left: on-target and off-target perplexity ratio against the coefficient, one line per
    layer (colour = layer), with the off-target budget. Right: the on-target ratio as a
    layer x coefficient heat map; x marks cells over the off-target budget, grey cells
    were skipped or not reached, a star (``gid`` :data:`RECOMMENDED_GID`) marks the
    recommended cell. The caller closes it (``matplotlib.pyplot.close``).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    grid = _Grid.of(result)
    figure = plt.figure(figsize=(15, max(5.0, 0.28 * len(grid.layers) + 2.5)), layout="constrained")
    spec = figure.add_gridspec(2, 2, width_ratios=[1.2, 1])
    ax_on, ax_off = figure.add_subplot(spec[0, 0]), figure.add_subplot(spec[1, 0])
    _draw_curves(figure, ax_on, ax_off, grid)
    _draw_map(figure, figure.add_subplot(spec[:, 1]), grid, grid.cell_of(result.get("recommended")))
    figure.suptitle(_title(result))
    return figure


def _draw_curves(figure, ax_on, ax_off, grid: _Grid) -> None:
    """The two ratio-against-coefficient panels, one line per layer, and their layer colour bar."""
    import matplotlib.pyplot as plt
    from matplotlib import colors

    cmap = plt.get_cmap("viridis")
    low, high = min(grid.layers, default=0), max(grid.layers, default=1)
    norm = colors.Normalize(vmin=low, vmax=max(high, low + 1))
    for i, layer in enumerate(grid.layers):
        for ax, values in ((ax_on, grid.on), (ax_off, grid.off)):
            mask = ~np.isnan(values[i])
            if mask.any():
                ax.plot(np.array(grid.coeffs)[mask], values[i][mask], "o-", ms=3, lw=1.2, color=cmap(norm(layer)))
    _style_ratio_axis(ax_on, grid, grid.on, "on-target perplexity ratio (steered / unsteered)")
    _style_ratio_axis(ax_off, grid, grid.off, "off-target perplexity ratio")
    ax_off.axhline(1.0 + grid.budget, color="crimson", ls="--", lw=1, label=f"budget +{grid.budget:.0%}")
    ax_off.legend(loc="upper left", fontsize=8)
    ax_off.set_xlabel("coefficient")
    bar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[ax_on, ax_off], pad=0.01, aspect=40)
    bar.set_label("layer L")


def _style_ratio_axis(ax, grid: _Grid, values: np.ndarray, title: str) -> None:
    from matplotlib import ticker

    coeffs = grid.coeffs
    ax.axhline(1.0, color="black", lw=0.8)
    finite = values[~np.isnan(values)]
    if finite.size and finite.max() > _Y_CLIP:
        # One broken layer (ratio 3) would flatten every other curve: clip the axis.
        ax.set_ylim(min(float(finite.min()), 1.0 - grid.budget) - 0.03, _Y_CLIP)
        title += f" (axis clipped at {_Y_CLIP:g})"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("ratio")
    if coeffs and all(c > 0 for c in coeffs):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(ticker.FixedLocator(coeffs))
        ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{c:g}" for c in coeffs]))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlim(min(coeffs) / 1.2, max(coeffs) * 1.2)
    elif coeffs:
        pad = 0.05 * (max(coeffs) - min(coeffs) or 1.0)
        ax.set_xlim(min(coeffs) - pad, max(coeffs) + pad)
    ax.grid(alpha=0.3)


def _draw_map(figure, ax, grid: _Grid, recommended: tuple[int, int] | None) -> None:
    """The on-target ratio heat map (cell ``(i, j)`` centred on x = j, y = i), its marks and colour bar."""
    import matplotlib.pyplot as plt
    from matplotlib import colors, ticker

    finite = grid.on[~np.isnan(grid.on)]
    # Symmetric in log around 1; saturating at 1.5x keeps a 5-10 % effect visible next to a broken cell.
    spread = float(np.max(np.abs(np.log(finite)))) if finite.size else 0.05
    spread = min(max(spread, math.log(1.05)), math.log(1.5))
    norm = colors.LogNorm(vmin=math.exp(-spread), vmax=math.exp(spread), clip=True)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d0d0d0")
    image = ax.imshow(np.ma.masked_invalid(grid.on), cmap=cmap, norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(len(grid.coeffs)), [f"{c:g}" for c in grid.coeffs])
    ax.set_yticks(range(len(grid.layers)), [str(layer) for layer in grid.layers])
    ax.set_xlabel("coefficient")
    ax.set_ylabel("layer L")
    ax.set_title(f"on-target ratio (x: off-target over +{grid.budget:.0%}, grey: skipped)", fontsize=10)
    _mark_cells(ax, grid, cmap, norm, recommended)
    if recommended is not None:
        i, j = recommended
        star = ax.scatter([j], [i], marker="*", s=13**2, edgecolors="black", facecolors="gold", zorder=3)
        star.set_gid(RECOMMENDED_GID)
    bar = figure.colorbar(image, ax=ax, pad=0.01, label="on-target ratio", extend="both")
    bar.ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2f"))
    bar.ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2f"))


def _mark_cells(ax, grid: _Grid, cmap, norm, recommended: tuple[int, int] | None) -> None:
    """An x on each cell over the budget and, on grids small enough to read, each cell's ratio.

    The ratio moves down on the recommended cell (its star sits in the middle) and up under an x.
    """
    annotate = len(grid.layers) * len(grid.coeffs) <= 200
    for (i, j), ratio in np.ndenumerate(grid.on):
        if np.isnan(ratio):
            continue
        over = grid.off[i, j] > 1.0 + grid.budget
        if over:
            ax.text(j, i, "×", ha="center", va="center", fontsize=14, color="black", alpha=0.55)
        if annotate:
            red, green, blue, _ = cmap(norm(ratio))
            ink = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.45 else "black"
            shift = 0.28 if over else (-0.3 if (i, j) == recommended else 0)
            ax.text(j, i + shift, f"{ratio:.2f}", ha="center", va="center", fontsize=6.5, color=ink)


def _title(result: dict) -> str:
    title = "pyactadd sweep"
    vector = result.get("vector") or {}
    if vector.get("positive") is not None:
        title += f": {vector['positive']!r} − {vector['negative']!r}"
    recommended = result.get("recommended")
    if recommended:
        title += f"; recommended L={recommended['layer']}, c={recommended['coeff']:g}"
    if not result.get("complete", True):
        title += " (interrupted)"
    return title


# ---------------------------------------------------------------- eval --coeffs: dose-response


def plot_dose_response(payload: dict, path: str | os.PathLike[str]) -> Path:
    """Draw a behavioural evaluation with several coefficients (``eval --json``'s dict) into a PNG at ``path``.

    Top: success rate against the coefficient with its 95 % intervals; bottom: mean
    disfluency with its interval. The unsteered and prompted conditions are horizontal
    lines (the prompted one is the paper's baseline).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steered = sorted((c for c in payload["conditions"] if c["coeff"] is not None), key=lambda c: c["coeff"])
    baselines = {c["condition"]: c for c in payload["conditions"] if c["coeff"] is None}
    figure, (ax_success, ax_disfluency) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, layout="constrained")
    x = np.array([c["coeff"] for c in steered], dtype=np.float64)
    panels = ((ax_success, lambda c: c["success"], "success rate"), (ax_disfluency, lambda c: c["disfluency"]["mean"], "disfluency (mean perplexity)"))
    for ax, pick, title in panels:
        points = [pick(c) for c in steered]
        known = [i for i, p in enumerate(points) if p is not None]
        values = np.array([points[i]["value"] for i in known])
        errors = np.array([[points[i]["value"] - points[i]["low"] for i in known], [points[i]["high"] - points[i]["value"] for i in known]])
        ax.errorbar(x[known], values, yerr=errors, fmt="o-", color="tab:blue", capsize=3, label="steered")
        for name, style in (("unsteered", ":"), ("prompted", "--")):
            point = pick(baselines[name]) if name in baselines else None
            if point is not None:
                ax.axhline(point["value"], color="black" if name == "unsteered" else "tab:orange", ls=style, label=name)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    ax_success.set_ylim(-0.02, 1.02)
    ax_success.legend(fontsize=8)
    ax_disfluency.set_xlabel("coefficient")
    figure.suptitle(f"pyactadd eval --task {payload['task']}: dose-response ({steered[0]['n'] if steered else 0} completions each)")
    from pyactadd.errors import InputError
    from pyactadd.files import atomic_write

    out = Path(path)
    try:
        atomic_write(out, lambda temp: figure.savefig(temp, dpi=110, format="png"), error=InputError)
    finally:
        plt.close(figure)
    return out
