"""Many-pair extraction (pyactadd.extract.pairs, pyactadd.extract.methods, ``extract --pairs``) on the real default model.

References are computed independently: every prompt alone (no batch, no padding, no
mask) through the model's own ``output_hidden_states``, then plain numpy (an
eigendecomposition of the pairs' Gram matrix, not the SVD the library uses).
"""

from __future__ import annotations

import json
import warnings

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pyactadd.cli import main
from pyactadd.errors import InputError
from pyactadd.extract.pipeline import SinkRowWarning, extract
from pyactadd.extract.methods import mean_difference, pca_direction
from pyactadd.extract.pairs import extract_pairs, last_token_activations
from pyactadd.prompts.pairs import Pair, load_pairs
from pyactadd.prompts.tokens import Tokenizer
from pyactadd.vector.value import SteeringVector
from helpers.vector_files import assert_clean_error

PAIRS = [
    Pair("I feel so happy today", "I feel so sad today"),
    Pair("What a wonderful surprise, I love it!", "Awful."),
    Pair("She smiled", "She cried and sobbed alone in the dark room"),
    Pair("This is the best day of my life", "This is the worst day of my life"),
    Pair("Sunshine, music and dancing", "Rain, silence and grief"),
]
LAYERS = [3, 9, 15]
quiet_sinks = pytest.mark.filterwarnings("ignore::pyactadd.extract.pipeline.SinkRowWarning")


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return Tokenizer.from_model(default_model_path)


@pytest.fixture(scope="module")
def reference(torch_model, tokenizer):
    """{L: (positive [n, d], negative [n, d])}: each prompt alone, read at its last token."""
    found = {layer: ([], []) for layer in LAYERS}
    with torch.inference_mode():
        for pair in PAIRS:
            for side, text in enumerate((pair.positive, pair.negative)):
                states = torch_model(input_ids=torch.tensor([tokenizer.encode(text)]), output_hidden_states=True).hidden_states
                for layer in LAYERS:
                    found[layer][side].append(states[layer][0, -1].double().numpy())
    return {layer: (np.array(pos), np.array(neg)) for layer, (pos, neg) in found.items()}


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# --- the pairs file -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"positive": "a", "negative": "b"}\n{"positive": "a"\n', "line 2 is not JSON"),
        ('{"positive": "a", "negative": "b", "x": 1}\n', "exactly the keys"),
        ('\n{"positive": "", "negative": "b"}\n', "line 2: positive must be a non-empty string"),
        ('["a", "b"]\n', "must be"),
        ("\n\n", "holds no pairs"),
    ],
)
def test_bad_pairs_files(tmp_path, content, fragment):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=fragment):
        load_pairs(path)


def test_pairs_file_reads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"positive": "Love", "negative": "Hate"}\n\n{"negative": "b", "positive": "a"}\n')
    assert load_pairs(path) == [Pair("Love", "Hate"), Pair("a", "b")]
    with pytest.raises(InputError, match="no such pairs file"):
        load_pairs(tmp_path / "missing.jsonl")


# --- the maths, against independent references ------------------------------------------


def test_last_token_activations_are_unbatched_hidden_states(reference):
    recorded = last_token_activations(PAIRS, LAYERS, batch_size=2)  # right padding inside every batch
    for layer in LAYERS:
        for side in (0, 1):
            assert recorded[layer][side].shape == (len(PAIRS), 576)
            close(recorded[layer][side], reference[layer][side])


def test_mean_is_mean_last_token_difference(reference):
    vector = extract_pairs(PAIRS, LAYERS, method="mean", batch_size=2, coeff=2.0)
    assert vector.alignment == "all" and vector.n_positions == 1 and vector.coefficient == 2.0
    assert vector.extra["method"] == "mean" and vector.extra["n_pairs"] == len(PAIRS)
    for layer in LAYERS:
        positive, negative = reference[layer]
        close(vector.layers[layer][0], 2.0 * (positive - negative).mean(axis=0))


@pytest.mark.parametrize("center", [False, True])
def test_pca_is_principal_axis_scaled_by_mean(reference, center):
    vector = extract_pairs(PAIRS, LAYERS, method="pca", pca_center=center, batch_size=3)
    explained = json.loads(vector.extra["pca_explained"])
    for layer in LAYERS:
        positive, negative = reference[layer]
        differences = positive - negative
        mean = differences.mean(axis=0)
        data = differences - mean if center else differences
        # The small Gram matrix's top eigenvector v gives the axis D^T v (and the same eigenvalues).
        values, vectors = np.linalg.eigh(data @ data.T)
        axis = data.T @ vectors[:, -1]
        axis /= np.linalg.norm(axis)
        expected = (mean @ axis) * axis  # the mean difference's component along the axis: sign-free
        got = vector.layers[layer][0].astype(np.float64)
        assert got @ mean > 0  # positive prompts project higher on average
        assert got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) > 0.9999
        np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(expected), rtol=1e-3)
        np.testing.assert_allclose(explained[str(layer)], values[-1] / values.sum(), rtol=1e-3)


def test_methods_unit():
    positive = np.array([[2.0, 0.0], [4.0, 1.0]], dtype=np.float32)
    negative = np.zeros((2, 2), dtype=np.float32)
    np.testing.assert_array_equal(mean_difference(positive, negative), [3.0, 0.5])
    vector, explained = pca_direction(negative, positive)  # swapped: the sign must follow the mean
    assert vector @ np.array([-3.0, -0.5]) > 0 and 0.9 < explained <= 1.0
    with pytest.raises(InputError, match="identical"):
        pca_direction(positive, positive)
    with pytest.raises(InputError, match="two pairs"):
        pca_direction(positive[:1], negative[:1], center=True)


@quiet_sinks
def test_actadd_with_one_pair_is_extract():
    single = extract_pairs([("Love", "Hate")], [6, 12], method="actadd", coeff=3.0)
    reference = extract("Love", "Hate", [6, 12], coeff=3.0)
    assert single.layer_ids == reference.layer_ids and single.alignment == "front"
    for layer in (6, 12):
        np.testing.assert_array_equal(single.layers[layer], reference.layers[layer])
    assert single.positive_ids == reference.positive_ids and single.pad_id == reference.pad_id


@quiet_sinks
def test_actadd_averages_padded_pairs(tokenizer):
    pairs = [("What a great day", "What a bad day"), ("We won the game", "We lost the game")]
    lengths = {len(tokenizer.encode(text)) for pair in pairs for text in pair}
    assert lengths == {4}, lengths  # same length: each pair alone is padded exactly as in the set
    together = extract_pairs(pairs, [5, 10], method="actadd", batch_size=1)
    alone = [extract(p, n, [5, 10]) for p, n in pairs]
    for layer in (5, 10):
        close(together.layers[layer], (alone[0].layers[layer].astype(np.float64) + alone[1].layers[layer]) / 2, rtol=1e-5)


def test_batch_size_does_not_change_results():
    one = extract_pairs(PAIRS, [9], method="mean", batch_size=1)
    many = extract_pairs(PAIRS, [9], method="mean", batch_size=5)
    close(one.layers[9], many.layers[9], rtol=1e-5)


# --- attention sinks -----------------------------------------------------------------------


def test_single_token_prompts_warn_about_the_sink():
    with pytest.warns(SinkRowWarning, match="anchor"):
        extract_pairs([("Love", "Hate"), ("Joy", "Pain")], [15], method="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkRowWarning)
        extract_pairs([("Love", "Hate"), ("Joy", "Pain")], [15], method="mean", anchor="<|im_start|>")


def test_actadd_zero_outliers():
    with pytest.warns(SinkRowWarning, match="position 0"):
        warned = extract_pairs([("Love", "Hate"), ("Joy", "Pain")], [15], method="actadd")
    assert np.any(warned.layers[15][0])
    zeroed = extract_pairs([("Love", "Hate"), ("Joy", "Pain")], [15], method="actadd", zero_outliers=True)
    assert not np.any(zeroed.layers[15][0]) and zeroed.zeroed_rows == {15: [0]}


# --- the masked recorder ---------------------------------------------------------------------


def test_masked_recording_matches_unpadded(torch_model):
    from pyactadd.extract.activations import record_block_inputs

    short, long = [57, 1407, 588], [57, 1407, 588, 5587, 1834]
    batch = [short + [2, 2], long]
    recorded = record_block_inputs(torch_model, batch, [4, 20], attention_mask=[[1, 1, 1, 0, 0], [1] * 5])
    with torch.inference_mode():
        alone = torch_model(input_ids=torch.tensor([short]), output_hidden_states=True).hidden_states
    for layer in (4, 20):
        close(recorded[layer][0, :3], alone[layer][0].numpy(), rtol=1e-5)
    for mask, fragment in (([[1, 1, 1, 0, 0]], "shape"), ([[0, 1, 1, 1, 1], [1] * 5], "right-padding"), ([[0] * 5, [1] * 5], "right-padding")):
        with pytest.raises(InputError, match=fragment):
            record_block_inputs(torch_model, batch, [4], attention_mask=mask)


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"positive": p.positive, "negative": p.negative}) + "\n" for p in PAIRS))
    return path


def test_cli_pairs_mean_and_pca(tmp_path, pairs_file):
    out = tmp_path / "mean.gguf"
    result = CliRunner().invoke(main, ["extract", "--pairs", str(pairs_file), "--method", "mean", "-l", "6", "-l", "12", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean over 5 pairs" in result.output
    vector = SteeringVector.load(out)
    assert vector.alignment == "all" and vector.n_positions == 1 and vector.layer_ids == [6, 12]
    assert vector.extra["method"] == "mean"
    assert [len(t.shape) for t in gguf.GGUFReader(out).tensors] == [1, 1]  # stock llama.cpp loads it
    out = tmp_path / "pca.gguf"
    result = CliRunner().invoke(main, ["extract", "--pairs", str(pairs_file), "--method", "pca", "--pca-center", "-l", "9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert SteeringVector.load(out).extra["pca_center"] is True


def test_cli_pairs_actadd_default(tmp_path, pairs_file):
    out = tmp_path / "actadd.gguf"
    result = CliRunner().invoke(main, ["extract", "--pairs", str(pairs_file), "-l", "6", "--batch-size", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    vector = SteeringVector.load(out)
    assert vector.alignment == "front" and vector.extra["method"] == "actadd" and vector.n_positions == 11


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-p", "Love", "--pairs", "PAIRS"], "not both"),
        ([], "--pairs FILE.jsonl"),
        (["-p", "Love", "-n", "Hate", "--method", "mean"], "--pairs only"),
        (["--pairs", "PAIRS", "--method", "mean", "--zero-row", "0"], "method actadd"),
        (["--pairs", "PAIRS", "--method", "mean", "--pca-center"], "pca only"),
        (["--pairs", "MISSING"], "no such pairs file"),
        (["--pairs", "PAIRS", "-l", "30"], "out of range"),
    ],
)
def test_cli_pairs_errors(tmp_path, pairs_file, args, fragment):
    out = tmp_path / "out.gguf"
    args = [str(pairs_file) if a == "PAIRS" else str(tmp_path / "missing.jsonl") if a == "MISSING" else a for a in args]
    if "-l" not in args:
        args += ["-l", "6"]
    assert_clean_error(CliRunner().invoke(main, ["extract", *args, "-o", str(out)]), fragment)
    assert not out.exists()
