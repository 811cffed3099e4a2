"""Chat prompts: turns rendered by the model's own chat template, then tokenized.

``pyactadd run --chat`` (one user turn) and the server's ``/v1/chat/completions`` (any
conversation) both come here, so the same turns give the same token ids on either path.
The template is the GGUF's ``tokenizer.chat_template``, rendered by llama-cpp-python's
:class:`~llama_cpp.llama_chat_format.Jinja2ChatFormatter`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from pyactadd.errors import InputError
from pyactadd.prompts.tokens import apply_anchor

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system turn; chat templates know only "system".
ROLE_ALIASES = {"developer": "system"}


def user_turn(text: str) -> list[dict[str, str]]:
    """A conversation of one user message."""
    return [{"role": "user", "content": text}]


def _turns(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    turns = []
    for index, message in enumerate(messages):
        role = ROLE_ALIASES.get(message["role"], message["role"])
        if role not in ROLES:
            raise InputError(f"message {index} has role {message['role']!r}: use system, user or assistant")
        if not message["content"].strip():
            raise InputError(f"message {index} is empty: give every message some text")
        turns.append({"role": role, "content": message["content"]})
    if not turns:
        raise InputError("no messages: give at least one")
    return turns


def chat_text(llama, messages: Sequence[Mapping[str, str]]) -> str:
    """``messages`` (dicts with ``role`` and ``content``) as the text of the model's chat template.

    The template writes its own BOS text where the model wants one, and ends with the
    assistant's turn opened.

    Raises:
        InputError: an empty message, an unknown role, or a model without a chat template.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    turns = _turns(messages)
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise InputError("this model has no chat template in its GGUF: send a plain prompt (without --chat, or to /v1/completions)")

    def special(token_id: int) -> str:
        return llama.detokenize([token_id], special=True).decode("utf-8", "replace")

    formatter = Jinja2ChatFormatter(template=template, eos_token=special(llama.token_eos()), bos_token=special(llama.token_bos()))
    return formatter(messages=turns).prompt


def chat_ids(llama, messages: Sequence[Mapping[str, str]], *, anchor_id: int | None = None) -> list[int]:
    """The token ids llama.cpp evaluates for a chat: :func:`chat_text`, tokenized with
    special tokens and no extra BOS, then the anchor token put in front (when given).

    Raises:
        InputError: as :func:`chat_text`.
    """
    ids = llama.tokenize(chat_text(llama, messages).encode("utf-8"), add_bos=False, special=True)
    return apply_anchor(ids, anchor_id)
