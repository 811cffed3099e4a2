"""The completion scorers: VADER sentiment, a local transformers classifier, the target-word scorer."""

from __future__ import annotations

import json

import pytest

from pyactadd.errors import InputError
from pyactadd.measure.scoring import (
    TransformersSentiment,
    VaderSentiment,
    WordScorer,
    classifier_labels,
    make_task,
    parse_targets,
    shipped_words,
)


def test_vader_classifies_clear_text_both_ways():
    texts = ["I love this, it is wonderful and makes me happy.", "This is awful, I hate it and feel terrible.", "The table is in the kitchen."]
    positive = VaderSentiment("positive")
    assert positive(texts) == [True, False, False]
    assert VaderSentiment("negative")(texts) == [False, True, False]
    scores = positive.compound(texts)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == pytest.approx(0.0, abs=1e-9)


def test_unknown_direction_is_refused():
    with pytest.raises(InputError, match="positive or negative"):
        VaderSentiment("happy")


def test_word_scorer_whole_words_any_case():
    scorer = WordScorer(["wedding", " bride ", "C++", "wedding"])
    assert scorer.words == ["wedding", "bride", "C++"]
    texts = ["The WEDDING was long.", "weddings everywhere", "a bridesmaid", "the bride, smiling", "I write c++ daily", "nothing here"]
    assert scorer(texts) == [True, False, False, True, True, False]
    assert scorer.found("Our Wedding day") == "Wedding"
    assert scorer.found("prewedding") is None


def test_word_scorer_needs_a_word():
    with pytest.raises(InputError, match="no target words"):
        WordScorer([" ", ""])


def test_parse_targets_list_and_file(tmp_path):
    assert parse_targets("wedding, bride ,,groom") == ["wedding", "bride", "groom"]
    path = tmp_path / "words.txt"
    path.write_text("ship\n\n port \n", encoding="utf-8")
    assert parse_targets(str(path)) == ["ship", "port"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="is empty"):
        parse_targets(str(empty))
    with pytest.raises(InputError, match="no target words"):
        parse_targets(" , ")


def test_topic_task_uses_the_shipped_wedding_words():
    words = shipped_words("wedding_words.txt")
    assert {"wedding", "weddings", "marry", "married", "marriage", "bride", "groom", "honeymoon", "wed"} <= set(words)
    task = make_task("topic")
    assert task.default_openings == "neutral_openings.txt"
    assert task.score(["They got married in May.", "They went shopping in May."]) == [True, False]
    assert make_task("sentiment", direction="negative").default_openings == "positive_openings.txt"
    with pytest.raises(InputError, match="needs --targets"):
        make_task("words")
    with pytest.raises(InputError, match="unknown task"):
        make_task("toxicity")


def _write_config(folder, config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def test_classifier_directory_is_validated(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        classifier_labels(tmp_path / "missing")
    with pytest.raises(InputError, match="no config.json"):
        classifier_labels(tmp_path)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not readable JSON"):
        classifier_labels(tmp_path)
    _write_config(tmp_path, {"model_type": "bert"})
    with pytest.raises(InputError, match="no id2label"):
        classifier_labels(tmp_path)
    _write_config(tmp_path, {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}})
    with pytest.raises(InputError, match="'pos' and 'neg'"):
        classifier_labels(tmp_path)
    _write_config(tmp_path, {"id2label": {"0": "negative", "1": "neutral", "2": "Positive"}})
    assert classifier_labels(tmp_path) == {0: "negative", 1: "other", 2: "positive"}


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny BERT classifier whose output layer always picks POSITIVE (zero weights, bias toward label 1)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("classifier")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "love", "hate", "it"]) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    model.save_pretrained(folder)
    BertTokenizer(str(vocab)).save_pretrained(folder)
    return folder


def test_transformers_classifier_maps_labels_to_directions(tiny_classifier):
    texts = ["i love it", "i hate it", "it"]
    assert TransformersSentiment(tiny_classifier, "positive", batch_size=2)(texts) == [True, True, True]
    assert TransformersSentiment(tiny_classifier, "negative")(texts) == [False, False, False]
    assert make_task("sentiment", classifier=tiny_classifier).score(["i love it"]) == [True]
