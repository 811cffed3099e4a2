"""The attention-sink rule (pyactadd.extract.sinks) on made-up residuals (the model only for its tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from pyactadd.extract.sinks import SINK_RATIO, SinkCheck, SinkRowWarning, first_position_is_sink
from pyactadd.prompts.tokens import Tokenizer


def _reference(norm: float, n: int = 9, width: int = 4) -> dict[int, np.ndarray]:
    rows = np.zeros((1, n, width), dtype=np.float32)
    rows[0, :, 0] = norm
    return {5: rows}


def test_a_row_over_the_ratio_is_an_outlier_and_shared_prefixes_are_not():
    check = SinkCheck(_reference(1.0))
    h = np.zeros((2, 3, 4), dtype=np.float32)
    h[:, :, 0] = 1.0
    h[0, 0, 0] = h[1, 0, 0] = 100.0  # a sink at position 0, but the prompts share token 0
    h[0, 2, 0] = SINK_RATIO * 1.5  # position 2: the positive prompt's residual is far above typical
    check.add_pair_rows(5, h, [[7, 8, 9], [7, 6, 9]])
    found = check.row_outliers()
    assert [(o.layer, o.position, o.what, o.tokens) for o in found] == [(5, 2, "residual", (9, 9))]
    assert check.typical(5) == 1.0


def test_a_difference_larger_than_both_residuals_is_reported_as_such():
    check = SinkCheck(_reference(1.0))
    h = np.ones((2, 2, 4), dtype=np.float32)
    h[0, 1] = [0.0, 9.0, 0.0, 0.0]
    h[1, 1] = [0.0, -9.0, 0.0, 0.0]  # each residual 9x typical, their difference 18x
    check.add_pair_rows(5, h, [[1, 2], [1, 3]])
    (outlier,) = check.row_outliers()
    assert outlier.position == 1 and outlier.what == "difference" and outlier.norm == 18.0


def test_last_tokens_over_the_ratio_are_warned_about(default_model_path):
    check = SinkCheck(_reference(2.0))
    last = np.zeros((4, 4), dtype=np.float32)
    last[:, 0] = 2.0
    last[3, 0] = 2.0 * SINK_RATIO + 1  # pair 1's negative prompt, one token long: its last token is position 0
    check.check_last_tokens(5, last, [([1, 2], [1, 3]), ([1, 2, 3], [4])])
    tokenizer = Tokenizer.from_model(default_model_path)
    with pytest.warns(SinkRowWarning, match=r"layer 5: the last token of pair\(s\) 1 sits on an attention sink .*anchor=") as record:
        check.warn_last_tokens(tokenizer, None, stacklevel=1)
    assert len(record) == 1 and record[0].filename == __file__


def test_position_0_is_a_sink_only_without_anchor_and_bos():
    assert first_position_is_sink(None, adds_bos=False)
    assert not first_position_is_sink(1, adds_bos=False)
    assert not first_position_is_sink(None, adds_bos=True)
