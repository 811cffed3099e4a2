"""The sweep figure, read back from matplotlib: the recommended cell's star sits on that cell."""

from __future__ import annotations

import numpy as np
import pytest

from pyactadd.measure.plots import RECOMMENDED_GID, plot_sweep, sweep_figure
from pyactadd.measure.sweep import Cell, SweepResult

pytest.importorskip("matplotlib")

LAYERS = [4, 8, 12]
COEFFS = [0.25, 0.5, 1.0, 2.0]


def swept(recommended: tuple[int, float]) -> dict:
    """A finished sweep's JSON with every cell evaluated; ``recommended`` is the cell marked as the choice."""
    rng = np.random.default_rng(0)
    cells = [
        Cell(layer, coeff, "ok", on_ratio=float(rng.uniform(0.9, 1.1)), off_ratio=float(rng.uniform(0.98, 1.2)), score=0.0)
        for layer in LAYERS
        for coeff in COEFFS
    ]
    result = SweepResult(cells=cells, budget=0.05, complete=True)
    result.recommended = next(c for c in cells if (c.layer, c.coeff) == recommended)
    return result.as_dict()


def stars(figure) -> list:
    return [c for ax in figure.axes for c in ax.collections if c.get_gid() == RECOMMENDED_GID]


@pytest.mark.parametrize("recommended", [(8, 0.5), (4, 0.25), (12, 2.0)])
def test_star_sits_on_the_recommended_cell(recommended):
    import matplotlib.pyplot as plt

    data = swept(recommended)
    figure = sweep_figure(data)
    try:
        (star,) = stars(figure)
        row, column = LAYERS.index(recommended[0]), COEFFS.index(recommended[1])
        np.testing.assert_array_equal(star.get_offsets(), [[column, row]])
        # The heat map's cell at those data coordinates is the recommended cell's on-target ratio.
        (image,) = star.axes.get_images()
        assert image.get_array()[row, column] == pytest.approx(data["recommended"]["tune"]["on_ratio"])
    finally:
        plt.close(figure)


def test_no_star_without_a_recommendation(tmp_path):
    import matplotlib.pyplot as plt

    data = swept((8, 0.5))
    data["recommended"] = None
    figure = sweep_figure(data)
    try:
        assert stars(figure) == []
    finally:
        plt.close(figure)
    assert plot_sweep(data, tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
