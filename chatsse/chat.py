"""The ``POST /chat`` front: its request, its events, its route.

The flow of one ``POST /chat`` (README, "Protocol")::

    ChatEndpoint: read and validate the body, size check -> open_turn (chatsse/turns.py):
        Lifecycle.admit (a slot) -> ConversationManager.begin_turn -> the engine's start
    EventStreamResponse (chatsse/sse.py), the body in a task of its own:
        TurnStream.run (chatsse/turns.py) with ChatEvents: connected -> message* -> store
        reply -> completed; or stopped (client gone, a deadline, the drain) -> store the
        partial reply -> error event
    TurnStream.close: release the slot, record metrics and the log line

Every turn stores exactly one assistant message: the text the server sent, with the finish
reason of how it ended (chatsse.protocol.ENDINGS).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Scope

from chatsse import protocol
from chatsse.auth import caller_of
from chatsse.conversations import Turn
from chatsse.endpoints import DirectEndpoint
from chatsse.engine import DEFAULT_OPTIONS
from chatsse.errors import MessageTooLarge
from chatsse.models import ChatRequest, ErrorBody
from chatsse.responses import invalid_request, json_error
from chatsse.sse import dumps, encode_event
from chatsse.state import AppState
from chatsse.turns import Begun, StoredReply, TurnResult, open_turn

if TYPE_CHECKING:
    from chatsse.app import ChatsseApp

__all__ = ["FRONT", "ChatEndpoint", "ChatEvents", "add_chat_route", "message_event"]

_escape: Callable[[str], str] = json.encoder.encode_basestring
# The fixed text of a message event after its id, from the protocol's names.
(_DELTA_KEY,) = protocol.MessageData.__annotations__
_MESSAGE_HEAD: Final = f'\nevent: {protocol.MESSAGE}\ndata: {{"{_DELTA_KEY}":'
FRONT: Final = "chat"  # the name its replay logs carry (chatsse/replay/)


def message_event(message_id: str, position: int, text: str) -> bytes:
    """A ``message`` event, as :meth:`ChatEvents.delta` writes it (a resumed stream's too)."""
    return f"id: {protocol.event_id(message_id, position)}{_MESSAGE_HEAD}{_escape(text)}}}\n\n".encode()


class ChatEvents:
    """The events of one ``POST /chat`` turn, numbering their ids (chatsse/protocol.py).

    ``delta`` is the per-token hot path: one f-string, one C-level JSON string escape, one
    UTF-8 encode.
    """

    __slots__ = ("_model", "_prefix", "_retry_ms", "_turn", "seq")
    status = 200

    def __init__(self, turn: Turn, *, model: str, retry_ms: int) -> None:
        self._turn = turn
        self._model = model
        self._retry_ms = retry_ms
        self._prefix = "id: " + protocol.event_id(turn.reply_id, 0).removesuffix("0")
        self.seq = 0

    def _event(self, name: str, data: object, retry: int | None = None) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return encode_event(name, dumps(data), id=protocol.event_id(self._turn.reply_id, seq), retry=retry)

    def opening(self) -> bytes:
        turn = self._turn
        data: protocol.ConnectedData = {
            "conversation_id": turn.conversation_id,
            "user_message_id": turn.user_message.id,
            "message_id": turn.reply_id,
            "model": self._model,
            "created": turn.user_message.created_at,
            "resume_url": protocol.resume_path(turn.conversation_id, turn.reply_id),
        }
        return self._event(protocol.CONNECTED, data, retry=self._retry_ms)

    def delta(self, text: str) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return f"{self._prefix}{seq}{_MESSAGE_HEAD}{_escape(text)}}}\n\n".encode()

    def completed(self, result: TurnResult) -> bytes:
        data: protocol.CompletedData = {
            "conversation_id": self._turn.conversation_id,
            "message_id": self._turn.reply_id,
            "content": result.content,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            "timings": {"ttft_ms": result.ttft_ms, "total_ms": result.total_ms},
        }
        return self._event(protocol.COMPLETED, data)

    def error(self, error_type: str, message: str) -> bytes:
        data: protocol.ErrorData = {"type": error_type, "message": message, "message_id": self._turn.reply_id}
        return self._event(protocol.ERROR, data)


_CHAT_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The reply as an SSE stream."},
    404: {"model": ErrorBody, "description": "Unknown conversation."},
    409: {"model": ErrorBody, "description": "Conversation busy (a turn in progress) or full."},
    413: {"model": ErrorBody, "description": "Message over CHATSSE_MAX_MESSAGE_SIZE."},
    422: {"model": ErrorBody, "description": "Invalid JSON or fields."},
    503: {"model": ErrorBody, "description": "Too many open streams, draining, or store down."},
}


class ChatEndpoint(DirectEndpoint):
    """``POST /chat`` (chatsse/endpoints.py): a turn of a stored conversation."""

    path = "/chat"

    async def handle(self, body: bytes, scope: Scope) -> Response:
        return await self.start(ChatRequest.model_validate_json(body), scope)

    def error(self, status: int, error_type: str, message: str, **extra: Any) -> Response:
        return json_error(status, error_type, message, **extra)

    def invalid(self, exc: ValidationError) -> Response:
        return invalid_request(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        )

    async def start(self, body: ChatRequest, scope: Scope) -> Response:
        """Admit the stream and begin the turn; the response that streams it."""
        state = self.state
        settings, manager = state.settings, state.manager
        size = len(body.message.encode())
        if size > settings.max_message_size:
            state.metrics.reject(MessageTooLarge.type)
            raise MessageTooLarge(f"message is {size} bytes; the limit is {settings.max_message_size}")
        turn: Turn | None = None

        async def begin() -> Begun:
            nonlocal turn
            turn = await manager.begin_turn(body.conversation_id, body.message, owner=caller_of(scope).owner)
            return Begun(turn.prompt, StoredReply(manager, turn), partial(manager.abandon, turn))

        def events(begun: Begun) -> ChatEvents:
            assert turn is not None
            return ChatEvents(turn, model=state.engine.name, retry_ms=settings.sse_retry_ms)

        return await open_turn(
            state,
            scope,
            begin=begin,
            reply_format=events,
            max_tokens=min(body.max_tokens or settings.max_reply_tokens, settings.max_reply_tokens),
            options=DEFAULT_OPTIONS,
            replay_front=FRONT if settings.replay_log else None,
        )


def add_chat_route(app: ChatsseApp, state: AppState) -> None:
    """``POST /chat``: the endpoint, and its declaration in the OpenAPI schema."""
    endpoint = ChatEndpoint(state)
    app.add_direct_route("POST", endpoint.path, endpoint)

    @app.post("/chat", responses=_CHAT_RESPONSES)
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await endpoint.start(body, request.scope)
