"""The ``POST /v1/chat/completions`` front: OpenAI's Chat Completions API, stateless.

The client sends the whole history each turn; chatsse stores nothing (an ``Unstored`` reply
sink) and streams ``chat.completion.chunk`` objects as the official SDK reads them::

    data: {"id": "chatcmpl-..", ..., "choices": [{"delta": {"role": "assistant", ...}}]}
    data: {..., "choices": [{"delta": {"content": "<token>"}, ...}]}     (one per token)
    data: {..., "choices": [{"delta": {}, "finish_reason": "stop" | "length"}]}
    data: {..., "choices": [], "usage": {...}}            (stream_options.include_usage)
    data: [DONE]

One ``id`` and ``created`` per stream. An error during the stream is in band,
``data: {"error": {...}}`` (the SDK raises ``APIError``), then ``data: [DONE]``. Without
``stream`` the same turn is answered as one ``chat.completion`` object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final

from starlette.responses import Response
from starlette.types import Scope

from chatsse.errors import MessageTooLarge
from chatsse.ids import new_id
from chatsse.models import Message, Role
from chatsse.openai.requests import ChatCompletionRequest
from chatsse.openai.wire import (
    STREAM_ERROR_STATUS,
    BufferedAnswer,
    OpenAIEndpoint,
    check_model,
    openai_error_data,
)
from chatsse.sse import dumps
from chatsse.turns import Begun, TurnResult, Unstored, open_turn

__all__ = ["ChatCompletionsEndpoint", "CompletionBody", "CompletionChunks"]

_escape: Callable[[str], str] = json.encoder.encode_basestring
_DONE: Final = b"data: [DONE]\n\n"
_ROLES: Final[dict[str, Role]] = {"developer": "system"}


def _usage(result: TurnResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


class CompletionChunks:
    """The streamed chunks of one completion. ``delta`` is the hot path: one f-string around
    one C-level JSON string escape, like ``/chat``'s ``message`` event."""

    __slots__ = ("_head", "_include_usage", "_prefix")
    status = 200

    def __init__(self, *, model: str, include_usage: bool) -> None:
        head = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time())}
        self._head = {**head, "model": model}
        self._include_usage = include_usage
        self._prefix = "data: " + dumps(self._head)[:-1] + ',"choices":[{"index":0,"delta":{"content":'

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {dumps({**self._head, 'choices': choices, **extra})}\n\n".encode()

    def opening(self) -> bytes:
        delta = {"role": "assistant", "content": ""}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def delta(self, text: str) -> bytes:
        return f'{self._prefix}{_escape(text)}}},"logprobs":null,"finish_reason":null}}]}}\n\n'.encode()

    def completed(self, result: TurnResult) -> bytes:
        finish = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": result.finish_reason}]
        last = self._chunk(finish)
        if self._include_usage:
            last += self._chunk([], usage=_usage(result))
        return last + _DONE

    def error(self, error_type: str, message: str) -> bytes:
        data = openai_error_data(STREAM_ERROR_STATUS.get(error_type, 500), error_type, message)
        return f"data: {dumps(data)}\n\n".encode() + _DONE


class CompletionBody(BufferedAnswer):
    """One ``chat.completion`` object (a request without ``stream``)."""

    __slots__ = ("_model",)

    def __init__(self, *, model: str) -> None:
        super().__init__()
        self._model = model

    def completed(self, result: TurnResult) -> bytes:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.content, "refusal": None},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        body = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model,
            "choices": [choice],
            "usage": _usage(result),
        }
        return dumps(body).encode()


class ChatCompletionsEndpoint(OpenAIEndpoint):
    path = "/v1/chat/completions"

    async def handle(self, body: bytes, scope: Scope) -> Response:
        return await self.start(ChatCompletionRequest.model_validate_json(body), scope)

    async def start(self, body: ChatCompletionRequest, scope: Scope) -> Response:
        state = self.state
        settings = state.settings
        check_model(state, body.model)
        now = time.time()
        prompt = [Message("", _ROLES.get(m.role, m.role), m.text, now) for m in body.messages]  # type: ignore[arg-type]
        size = sum(len(m.content.encode()) for m in prompt)
        limit = settings.max_message_size * settings.max_history_length
        if size > limit:
            state.metrics.reject(MessageTooLarge.type)
            raise MessageTooLarge(
                f"the messages are {size} bytes; the limit is {limit}"
                " (CHATSSE_MAX_MESSAGE_SIZE x CHATSSE_MAX_HISTORY_LENGTH)"
            )

        async def begin() -> Begun:
            return Begun(prompt, Unstored())

        def reply_format(begun: Begun) -> CompletionChunks | CompletionBody:
            if body.stream:
                return CompletionChunks(model=body.model, include_usage=body.include_usage)
            return CompletionBody(model=body.model)

        limit_tokens = settings.max_reply_tokens
        return await open_turn(
            state,
            scope,
            begin=begin,
            reply_format=reply_format,
            max_tokens=min(body.reply_limit or limit_tokens, limit_tokens),
            options=body.options(),
            buffered=not body.stream,
        )
