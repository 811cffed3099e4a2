"""Scoring completions for behavioural evaluation: a sentiment classifier or a target-word list.

Each scorer turns a list of completion texts into one boolean per text, "the completion did
what the steering was meant to do":

* :class:`VaderSentiment` (the default): VADER's rule-based lexicon, offline and fast. Its
  compound score is >= 0.05 for positive text and <= -0.05 for negative text (VADER's own
  thresholds); success toward ``positive`` is a compound >= 0.05. This differs from the
  ActAdd paper, which classifies with a RoBERTa sentiment model: numbers are comparable in
  direction, not in level.
* :class:`TransformersSentiment`: a local transformers sequence-classification model
  directory (``--classifier DIR``); its ``id2label`` names must say which label is positive
  and which negative.
* :class:`WordScorer`: success when the completion contains one of the words, as a whole
  word, case-insensitively (the paper's wedding experiment).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pyactadd.errors import InputError

DIRECTIONS = ("positive", "negative")

TASKS = ("sentiment", "topic", "words")

TOPIC_WORDS = "wedding_words.txt"
"""The topic task's shipped word list (the paper's wedding words and their plurals)."""

OPENINGS = {"positive": "negative_openings.txt", "negative": "positive_openings.txt", "neutral": "neutral_openings.txt"}
"""The shipped openings each task completes by default: sentiment toward positive starts from negative
openings (and the other way round), topic and words from neutral ones."""

VADER_THRESHOLD = 0.05
"""VADER's documented compound-score threshold for positive (>=) and negative (<= minus it) text."""


def check_direction(direction: str) -> str:
    """``positive`` or ``negative``.

    Raises:
        InputError: anything else.
    """
    if direction not in DIRECTIONS:
        raise InputError(f"unknown sentiment direction {direction!r}: use positive or negative")
    return direction


class VaderSentiment:
    """Success = VADER classifies the text in ``direction`` (compound beyond +-0.05)."""

    name = "VADER (vaderSentiment 3.3.2, rule-based lexicon; the paper used a RoBERTa classifier)"

    def __init__(self, direction: str) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.direction = check_direction(direction)
        self._analyzer = SentimentIntensityAnalyzer()

    def compound(self, texts: Sequence[str]) -> list[float]:
        """VADER's compound score in [-1, 1] of each text."""
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in texts]

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        sign = 1.0 if self.direction == "positive" else -1.0
        return [sign * score >= VADER_THRESHOLD for score in self.compound(texts)]


def classifier_labels(directory: str | os.PathLike[str]) -> dict[int, str]:
    """``{label index: direction}`` of a transformers sequence-classification model directory.

    Each ``id2label`` name that contains "pos" or "neg" (case-insensitive) maps to that
    direction; other labels (neutral) map to ``"other"``.

    Raises:
        InputError: not a directory, no readable ``config.json``, no ``id2label``, or no
            label naming each direction.
    """
    path = Path(directory)
    fix = "pass a transformers sequence-classification model directory (config.json with id2label)"
    if not path.is_dir():
        raise InputError(f"--classifier {path} is not a directory: {fix}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = "no config.json" if isinstance(exc, FileNotFoundError) else "config.json is not readable JSON"
        raise InputError(f"--classifier {path}: {reason}: {fix}") from None
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if not isinstance(id2label, dict) or not id2label:
        raise InputError(f"--classifier {path}: config.json has no id2label: {fix}")
    labels: dict[int, str] = {}
    for key, name in id2label.items():
        lowered = str(name).lower()
        labels[int(key)] = "positive" if "pos" in lowered else "negative" if "neg" in lowered else "other"
    if not set(DIRECTIONS) <= set(labels.values()):
        raise InputError(
            f"--classifier {path}: id2label {id2label} does not name a positive and a negative label: "
            "use a sentiment model whose labels contain 'pos' and 'neg'"
        )
    return labels


class TransformersSentiment:
    """Success = a local sequence-classification model's top label is ``direction``."""

    def __init__(self, directory: str | os.PathLike[str], direction: str, *, batch_size: int = 32) -> None:
        self.direction = check_direction(direction)
        self.labels = classifier_labels(directory)
        self.name = f"transformers classifier {Path(directory)}"
        self.batch_size = batch_size
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            self._model = AutoModelForSequenceClassification.from_pretrained(str(directory), local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"--classifier {directory}: transformers cannot load it ({_first_line(exc)})") from None

    def predict(self, texts: Sequence[str]) -> list[int]:
        """The top label index of each text."""
        import torch

        out: list[int] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            encoded = self._tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                logits = self._model(**encoded).logits
            out.extend(int(i) for i in logits.argmax(dim=-1))
        return out

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        return [self.labels.get(index) == self.direction for index in self.predict(texts)]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class WordScorer:
    """Success = the text contains one of ``words`` as a whole word, case-insensitively.

    Raises:
        InputError: no non-blank word.
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(dict.fromkeys(w.strip() for w in words if w.strip()))
        if not self.words:
            raise InputError("no target words: give comma-separated words such as --targets wedding,bride or a file")
        # \b only works next to word characters: a word like "C++" is bounded by non-word lookarounds instead.
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        self.name = f"{len(self.words)} target words"

    def found(self, text: str) -> str | None:
        """The first target word in ``text`` (as written there), or None."""
        match = self._pattern.search(text)
        return match.group(0) if match else None

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        return [self.found(text) is not None for text in texts]


def parse_targets(value: str) -> list[str]:
    """Target words from ``--targets``: a file with one word a line if ``value`` names one, else a comma list.

    Raises:
        InputError: the file or list holds no word.
    """
    from pyactadd.prompts.files import read_text_lines

    path = Path(value)
    if path.is_file():
        lines = read_text_lines(path, what="targets file", expected="a file with one word a line", when_empty="is empty: put one word a line")
        words = [line for _, line in lines]
    else:
        words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise InputError("no target words: give comma-separated words such as --targets wedding,bride or a file")
    return words


@dataclass(frozen=True)
class Task:
    """What a behavioural evaluation counts as success, and the openings it completes by default."""

    name: str  # one of TASKS
    score: Callable[[Sequence[str]], list[bool]]
    description: str
    default_openings: str  # a shipped file in pyactadd/data


def make_task(
    name: str,
    *,
    direction: str = "positive",
    targets: Sequence[str] | None = None,
    classifier: str | os.PathLike[str] | None = None,
) -> Task:
    """The task ``name``: ``sentiment`` (toward ``direction``, VADER or ``classifier``), ``topic``
    (``targets`` or the shipped wedding words) or ``words`` (``targets`` required).

    Raises:
        InputError: an unknown task or direction, ``words`` without targets, a bad classifier directory.
    """
    if name == "sentiment":
        scorer = TransformersSentiment(classifier, direction) if classifier is not None else VaderSentiment(direction)
        return Task(name, scorer, f"{scorer.name}; success = classified {direction}", OPENINGS[direction])
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}: use perplexity, {', '.join(TASKS)}")
    if targets is None:
        if name == "words":
            raise InputError("--task words needs --targets WORDS (comma-separated, or a file with one word a line)")
        targets = shipped_words(TOPIC_WORDS)
    scorer = WordScorer(targets)
    shown = ", ".join(scorer.words[:8]) + (", ..." if len(scorer.words) > 8 else "")
    return Task(name, scorer, f"success = contains a target word ({shown}; whole word, any case)", OPENINGS["neutral"])


def shipped_words(name: str) -> list[str]:
    """The words of a shipped list in ``pyactadd/data``, one a line."""
    from pyactadd.measure.evaluation import shipped_text
    from pyactadd.prompts.files import read_sentences

    return read_sentences(shipped_text(name), what="word list")
