"""Request bodies of the OpenAI-compatible endpoints, and the JSON error every failure answers with.

Validation happens here, before a request reaches the model: every bad field gives a 400
whose ``error.param`` names it (``max_tokens``, ``steering[0].vector``), in OpenAI's error
shape ``{"error": {"message", "type", "param", "code"}}``. Fields of the OpenAI API that
this server does not implement (``logprobs``, ``echo``, ``suffix``, ``n`` > 1, ...) are
refused rather than silently ignored; fields it does not know at all are ignored, as
OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pyactadd.errors import InputError
from pyactadd.runtime.steering import Alignment, parse_alignment

# A vector name: what --vectors DIR's file stems and uploads are called. No path
# separators, no leading dot, so a name can never be read as a file path.
VECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
VECTOR_NAME_RULE = "letters, digits, '_', '-', '.', 1-64 characters, not starting with '.'"

MAX_STEERING_ITEMS = 16
MAX_STOP_SEQUENCES = 4
MAX_COEFF = 1e6
SEED_MAX = 2**31 - 1

# Defaults shared with `pyactadd run`, so a request that names no sampling settings
# generates what `pyactadd run` generates.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status.

    ``param`` names the request field at fault (``steering[1].coeff``) or is None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        """The JSON body: OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_vector_name(name: str) -> str:
    """Return ``name`` if it is a valid vector name, else raise ValueError saying why (a path is not a name)."""
    if not isinstance(name, str) or not VECTOR_NAME.fullmatch(name):
        hint = " (a name, not a file path: list names with GET /v1/steering/vectors)" if "/" in str(name) or "\\" in str(name) else ""
        raise ValueError(f"{name!r} is not a vector name{hint}; names use {VECTOR_NAME_RULE}")
    return name


def _not_bool(value: Any) -> Any:
    # JSON true is not a number: pydantic's lax mode would read it as 1.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _utf8_text(value: Any) -> Any:
    # JSON may carry a lone surrogate ("\ud800"): no UTF-8 encodes it, so llama.cpp's
    # tokenizer cannot take it. Refused here, with the field named, instead of a 500.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"character {exc.start} is a lone surrogate (U+{ord(value[exc.start]):04X}), which is not text: send valid UTF-8"
            ) from None
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Text = Annotated[str, BeforeValidator(_utf8_text)]


class SteeringItem(BaseModel):
    """One vector to add: ``{"vector": NAME, "coeff": C, "align": "front"|"back"|"all"|OFFSET}``."""

    model_config = ConfigDict(extra="forbid")

    vector: str = Field(description="Name of a vector listed by GET /v1/steering/vectors.")
    coeff: Float = Field(1.0, allow_inf_nan=False, description="Multiplies the vector's own coefficient.")
    align: Optional[Union[int, str]] = Field(
        None, description="front, back, all or a non-negative position offset; default: the vector's own."
    )

    @field_validator("vector")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_vector_name(value)

    @field_validator("coeff")
    @classmethod
    def _coeff(cls, value: float) -> float:
        if abs(value) > MAX_COEFF:
            raise ValueError(f"coefficient {value:g} is out of range: use |coeff| <= {MAX_COEFF:g}")
        return value

    @field_validator("align", mode="before")
    @classmethod
    def _align(cls, value: Any) -> Optional[Alignment]:
        # Before pydantic's own parsing, which would read JSON true as the offset 1.
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("alignment must be front, back, all or a non-negative integer offset")
        try:
            return parse_alignment(value)
        except InputError as exc:
            raise ValueError(str(exc)) from None


# OpenAI fields this server refuses unless they ask for nothing (absent, false, empty),
# named as the error says them.
UNSUPPORTED = {"logprobs": "logprobs are", "logit_bias": "logit_bias is", "echo": "echo is", "suffix": "suffix (insertion) is"}


def refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    """Pydantic field validator: refuse a field of :data:`UNSUPPORTED` that asks for something."""
    if value not in (None, False, "", {}):
        raise ValueError(f"{UNSUPPORTED[info.field_name]} not supported by this server")
    return value


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by completions and chat completions.

    Unknown fields are kept (``model_extra``) and ignored, except one that looks like a
    misspelt ``steering`` (refused by :func:`pyactadd.server.plan.prepare`): ignoring that
    would silently generate unsteered text.
    """

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = Field(None, description="Ignored: the server serves one model (GET /v1/models).")
    max_tokens: Optional[Int] = Field(None, ge=1)
    temperature: Float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Float = Field(DEFAULT_TOP_P, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[Int] = Field(None, ge=0, le=SEED_MAX)
    stop: Optional[Union[Text, list[Text]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logprobs: Optional[Any] = None
    logit_bias: Optional[dict[str, float]] = None
    steering: list[SteeringItem] = Field(default_factory=list, max_length=MAX_STEERING_ITEMS)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    _unsupported = field_validator("logprobs", "logit_bias")(refuse_unsupported)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_int(cls, value):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError("seed must be an integer")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    prompt: Union[Text, list[Text]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[Int] = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt (a string, or a list holding one string)")
            value = value[0]
        if not value.strip():
            raise ValueError("empty prompt: give a non-empty text")
        return value

    _unsupported_here = field_validator("echo", "suffix")(refuse_unsupported)


class TextPart(BaseModel):
    """A text part of a message's content list (``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One chat message; ``developer`` is read as ``system``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[Int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


def param_of(loc: tuple) -> str | None:
    """Turn a pydantic error location into the request field's name: ``("body", "steering", 0, "coeff")`` → ``steering[0].coeff``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            name += f".{part}" if name else part
        else:
            break  # a union member's type tag, e.g. "list[str]" or "function-after[...]"
    return name or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
