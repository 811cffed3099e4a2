"""Reading prompt files (pyactadd.prompts.files, pyactadd.prompts.pairs): one error ladder for every text file."""

from __future__ import annotations

import pytest

from pyactadd.errors import InputError
from pyactadd.prompts.files import read_sentences, read_text_lines
from pyactadd.prompts.pairs import Pair, load_pairs


def _lines(path):
    return read_text_lines(path, what="test file", expected="a test file", when_empty="is empty: write something")


def test_lines_are_numbered_stripped_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeff  one \n\n\ttwo\r\n   \nthree".encode())
    assert _lines(path) == [(1, "one"), (3, "two"), (5, "three")]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: None, "no such test file"),
        (lambda p: p.mkdir(), "is a directory: pass a test file"),
        (lambda p: p.write_bytes(b"fine\n\xff\xfe bad\n"), r"not UTF-8 text: byte 0xff on line 2"),
        (lambda p: p.write_text(" \n\n"), "is empty: write something"),
    ],
)
def test_the_error_ladder(tmp_path, make, fragment):
    path = tmp_path / "t.txt"
    make(path)
    with pytest.raises(InputError, match=fragment):
        _lines(path)


def test_sentences_and_pairs_share_the_ladder(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xc3\x28\n")
    for read in (read_sentences, load_pairs):
        with pytest.raises(InputError, match="not UTF-8 text: byte 0xc3 on line 1"):
            read(path)
    with pytest.raises(InputError, match="is a directory: pass a .jsonl file of prompt pairs"):
        load_pairs(tmp_path)
    with pytest.raises(InputError, match="no such --on file"):
        read_sentences(tmp_path / "missing.txt", what="--on file")


def test_pairs_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes('\ufeff{"positive": "Love", "negative": "Hate"}\n'.encode())
    assert load_pairs(path) == [Pair("Love", "Hate")]
