"""Chat prompts: one template implementation for `pyactadd run --chat` and the server."""

from __future__ import annotations

import pytest

from pyactadd.default_model import default_model_path
from pyactadd.errors import InputError
from pyactadd.native import llama_cpp_module
from pyactadd.prompts.chat import chat_ids, chat_text, user_turn
from pyactadd.runtime.generate import prompt_tokens


@pytest.fixture(scope="module")
def vocab():
    """The default model's tokenizer and metadata only (no weights)."""
    return llama_cpp_module().Llama(str(default_model_path()), vocab_only=True, verbose=False)


def test_one_user_turn_is_what_run_chat_evaluates(vocab):
    text = chat_text(vocab, user_turn("Tell me about your day"))
    assert "Tell me about your day" in text and text.index("user") < text.index("Tell me")
    ids = chat_ids(vocab, user_turn("Tell me about your day"))
    assert ids == prompt_tokens(vocab, "Tell me about your day", chat=True)
    assert ids == vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert chat_ids(vocab, user_turn("Hi"), anchor_id=7)[:1] == [7]


def test_a_conversation_keeps_every_turn_in_order(vocab):
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    text = chat_text(vocab, messages)
    positions = [text.index(m["content"]) for m in messages]
    assert positions == sorted(positions)
    assert text == chat_text(vocab, [{"role": "system", "content": "Be terse."}, *messages[1:]])  # developer is system


@pytest.mark.parametrize(
    ("messages", "message"),
    [([], "no messages"), ([{"role": "user", "content": "  "}], "message 0 is empty"), ([{"role": "tool", "content": "x"}], "role 'tool'")],
)
def test_bad_conversations_are_input_errors(vocab, messages, message):
    with pytest.raises(InputError, match=message):
        chat_text(vocab, messages)
