"""The request bodies of the OpenAI fronts, as pydantic models.

What chatsse supports of each API is exactly what these models accept. A parameter that is
not here is refused (``extra="forbid"``), and one that is here only at its no-op value
(``n``, ``logprobs``, ``tools``, ...) is refused at any other value: a client never gets a reply
that silently ignored what it asked for. README, "OpenAI APIs", lists both.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatsse.engine import GenerationOptions

__all__ = [
    "ChatCompletionRequest",
    "ChatMessageIn",
    "InputMessage",
    "ResponsesRequest",
    "StreamOptions",
    "TextPart",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _refuse_unless(body: BaseModel, allowed: dict[str, tuple[Any, ...]]) -> None:
    """Refuse each field set to anything but one of its no-op values."""
    for name, values in allowed.items():
        value = getattr(body, name)
        if value not in values:
            accepted = " or ".join(repr(v) for v in values if v is not None) or "unset"
            raise ValueError(f"{name}={value!r} is not supported by chatsse (only {accepted})")


class TextPart(_Strict):
    type: Literal["text", "input_text", "output_text"]
    text: str


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return _text(self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """Body of ``POST /v1/chat/completions``."""

    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    user: str | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        _refuse_unless(
            self,
            {
                "n": (None, 1),
                "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0),
                "logprobs": (None, False),
                "logit_bias": (None, {}),
                "tools": (None, []),
                "tool_choice": (None, "none", "auto"),
                "response_format": (None, {"type": "text"}),
                "store": (None, False),
            },
        )
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def options(self) -> GenerationOptions:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationOptions(self.temperature, self.top_p, self.seed, stop, self.user)


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return _text(self.content)


class _TextFormat(_Strict):
    type: Literal["text"]


class _TextConfig(_Strict):
    format: _TextFormat | None = None


class ResponsesRequest(_Strict):
    """Body of ``POST /v1/responses``."""

    model: str = Field(min_length=1)
    input: str | list[InputMessage]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    text: _TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    background: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        _refuse_unless(
            self,
            {
                "tools": (None, []),
                "tool_choice": (None, "none", "auto"),
                "include": (None, []),
                "reasoning": (None,),
                "metadata": (None, {}),
                "background": (None, False),
            },
        )
        if isinstance(self.input, list):
            users = [item for item in self.input if item.role == "user"]
            if len(users) != 1 or self.input[-1].role != "user":
                raise ValueError(
                    "input must hold exactly one user message, last (system or developer messages may"
                    " come before it); earlier turns come from previous_response_id"
                )
        return self

    @property
    def user_text(self) -> str:
        return self.input if isinstance(self.input, str) else self.input[-1].text

    @property
    def system_text(self) -> str | None:
        """``instructions`` and any system or developer input messages: this turn's only."""
        parts = [self.instructions] if self.instructions else []
        if isinstance(self.input, list):
            parts += [item.text for item in self.input if item.role != "user"]
        return "\n\n".join(parts) if parts else None

    def options(self) -> GenerationOptions:
        return GenerationOptions(self.temperature, self.top_p, None, (), self.user)
