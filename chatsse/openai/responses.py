"""The ``POST /v1/responses`` front: OpenAI's Responses API, its state in chatsse's stores.

A stored response is one turn of a chatsse conversation: its id names the conversation and
the reply message (``resp_<conversation id>.<message id>``, chatsse/openai/wire.py), so a
``previous_response_id`` continues that conversation on any worker, through the store
(memory, SQLite or Redis), with the store's turn lock and limits. ``store: false`` keeps
nothing: the turn reads the previous response's history, if any, and stores no message.

Conversations are linear: a turn may continue only from its conversation's latest response
(``response_not_latest``, 409, otherwise). ``instructions`` (and system or developer input
messages) apply to their own turn only and are not stored, as in OpenAI's API.

The stream, each event with ``event: <type>`` and a ``sequence_number`` from 0::

    response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta (per token),
    response.output_text.done, response.content_part.done, response.output_item.done,
    response.completed | response.incomplete (max_output_tokens) | response.failed (an error)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from starlette.responses import Response
from starlette.types import Scope

from chatsse.auth import caller_of
from chatsse.conversations import ConversationManager
from chatsse.errors import (
    ConversationBusy,
    ConversationNotFound,
    MessageTooLarge,
    ResponseNotFound,
    ResponseNotLatest,
)
from chatsse.ids import new_id
from chatsse.models import Message
from chatsse.openai.requests import ResponsesRequest
from chatsse.openai.wire import BufferedAnswer, OpenAIEndpoint, check_model, parse_response_id, response_id
from chatsse.protocol import FinishReason
from chatsse.sse import dumps
from chatsse.turns import Begun, StoredReply, TurnResult, Unstored, open_turn

__all__ = [
    "FRONT",
    "ResponseBody",
    "ResponseEvents",
    "ResponseHead",
    "ResponseReplay",
    "ResponsesEndpoint",
    "stored_response",
]

_escape: Callable[[str], str] = json.encoder.encode_basestring
_DELTA: Final = "response.output_text.delta"
# A stored reply's finish reason -> the response's status and why it is not complete.
_STATUS: Final[dict[str, tuple[str, str | None]]] = {
    "stop": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "interrupted": ("incomplete", "interrupted"),
    "stopped": ("cancelled", None),
}
FRONT: Final = "responses"  # the name its replay logs carry (chatsse/replay/)
OPENING_EVENTS: Final = 4  # the events of ResponseEvents.opening: sequence numbers 0 to 3
CLOSING_EVENTS: Final = 4  # at most, in the last item: ResponseEvents.completed's
_SEQUENCE = re.compile(rb'"sequence_number":(\d+)\}$')


@dataclass(slots=True)
class ResponseHead:
    """What a response object says of its request, the same in every event."""

    id: str
    item_id: str
    model: str
    created_at: float
    previous_response_id: str | None = None
    store: bool = True
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def object(
        self,
        status: str,
        *,
        text: str | None = None,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        done = status in ("completed", "incomplete", "cancelled")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": time.time() if done else None,
            "model": self.model,
            "output": []
            if text is None
            else [self.item(text, "completed" if status == "completed" else status)],
            "error": error,
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "user": self.user,
            "usage": usage,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "auto",
            "metadata": {},
        }

    def finished(self, result: TurnResult) -> dict[str, Any]:
        status, why = _STATUS[result.finish_reason]
        usage = {
            "input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        return self.object(status, text=result.content, usage=usage, incomplete=why)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """The streamed events of one response. ``delta`` is the hot path: one f-string."""

    __slots__ = ("_delta_head", "head", "seq")
    status = 200

    def __init__(self, head: ResponseHead) -> None:
        self.head = head
        self.seq = 0
        self._delta_head = (
            f'event: {_DELTA}\ndata: {{"type":"{_DELTA}","item_id":"{head.item_id}",'
            '"output_index":0,"content_index":0,"logprobs":[],"sequence_number":'
        )

    def _event(self, event_type: str, **data: Any) -> str:
        seq = self.seq
        self.seq = seq + 1
        return f"event: {event_type}\ndata: {dumps({'type': event_type, **data, 'sequence_number': seq})}\n\n"

    def opening(self) -> bytes:
        head = self.head
        started = head.object("in_progress")
        return (
            self._event("response.created", response=started)
            + self._event("response.in_progress", response=started)
            + self._event("response.output_item.added", output_index=0, item=head.item(None, "in_progress"))
            + self._event(
                "response.content_part.added",
                item_id=head.item_id,
                output_index=0,
                content_index=0,
                part=_text_part(""),
            )
        ).encode()

    def delta(self, text: str) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return f'{self._delta_head}{seq},"delta":{_escape(text)}}}\n\n'.encode()

    def completed(self, result: TurnResult) -> bytes:
        head = self.head
        final = head.finished(result)
        where = {"item_id": head.item_id, "output_index": 0, "content_index": 0}
        return (
            self._event("response.output_text.done", **where, text=result.content, logprobs=[])
            + self._event("response.content_part.done", **where, part=_text_part(result.content))
            + self._event("response.output_item.done", output_index=0, item=final["output"][0])
            # A cancelled (stopped) response ends as incomplete: the SDK has no other event for it.
            + self._event(
                f"response.{'completed' if final['status'] == 'completed' else 'incomplete'}", response=final
            )
        ).encode()

    def error(self, error_type: str, message: str) -> bytes:
        failed = self.head.object("failed", error={"code": error_type, "message": message})
        return self._event("response.failed", response=failed).encode()


class ResponseReplay:
    """A Responses stream read back from its replay log (chatsse/resume.py), after the event
    with sequence number ``starting_after``: the log's item ``i`` (a token, from 1) is the
    event with sequence number ``i + 3``; its first and last items hold several events each,
    of which only those after ``starting_after`` are sent."""

    def __init__(self, head: ResponseHead, starting_after: int | None) -> None:
        self.events = ResponseEvents(head)
        self.starting_after = -1 if starting_after is None else starting_after
        # Read from far enough back that the item holding ``starting_after`` is read: it may be
        # the last item, whose events begin at a number the log cannot say before it is read.
        self.after = max(-1, self.starting_after - (OPENING_EVENTS - 1) - CLOSING_EVENTS)

    def _after_start(self, item: str) -> bytes:
        kept = []
        for event in item.encode().split(b"\n\n"):
            found = _SEQUENCE.search(event)
            if found is not None and int(found[1]) > self.starting_after:
                kept.append(event + b"\n\n")
        return b"".join(kept)

    def event(self, position: int, item: str, last: bool) -> bytes:
        if position == 0 or last:
            return self._after_start(item)
        seq = position + OPENING_EVENTS - 1
        if seq <= self.starting_after:
            return b""
        self.events.seq = seq
        return self.events.delta(item)

    def error(self, error_type: str, message: str, position: int) -> bytes:
        # After the client's last event, even when the log ends before it: a producer that died
        # (``stream_lost``) may not have written the last events its client saw.
        self.events.seq = max(position + OPENING_EVENTS - 1, self.starting_after + 1)
        return self.events.error(error_type, message)


class ResponseBody(BufferedAnswer):
    """One response object (a request without ``stream``)."""

    __slots__ = ("head",)

    def __init__(self, head: ResponseHead) -> None:
        super().__init__()
        self.head = head

    def completed(self, result: TurnResult) -> bytes:
        return dumps(self.head.finished(result)).encode()


def _system(text: str | None) -> list[Message]:
    return [] if text is None else [Message("", "system", text, time.time())]


async def _history_to(
    manager: ConversationManager, previous: str, owner: str
) -> tuple[str, list[Message], int]:
    """The conversation a response id names (``owner``'s), its messages, and the index of that
    response."""
    conversation_id, message_id = parse_response_id(previous)
    try:
        messages = await manager.messages(conversation_id, owner=owner)
    except ConversationNotFound:
        messages = []
    for index, message in enumerate(messages):
        if message.id == message_id and message.role == "assistant":
            return conversation_id, messages, index
    raise ResponseNotFound(f"Previous response with id '{previous}' not found.")


class ResponsesEndpoint(OpenAIEndpoint):
    path = "/v1/responses"

    async def handle(self, body: bytes, scope: Scope) -> Response:
        return await self.start(ResponsesRequest.model_validate_json(body), scope)

    async def start(self, body: ResponsesRequest, scope: Scope) -> Response:
        state = self.state
        settings, manager = state.settings, state.manager
        check_model(state, body.model)
        text = body.user_text
        size = len(text.encode())
        if size > settings.max_message_size:
            state.metrics.reject(MessageTooLarge.type)
            raise MessageTooLarge(f"message is {size} bytes; the limit is {settings.max_message_size}")
        system = _system(body.system_text)
        owner = caller_of(scope).owner
        head = ResponseHead(
            id="",
            item_id="",
            model=body.model,
            created_at=time.time(),
            previous_response_id=body.previous_response_id,
            store=body.store,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            user=body.user,
        )

        async def begin_stored() -> Begun:
            conversation_id = None
            if body.previous_response_id is not None:
                conversation_id, messages, index = await _history_to(
                    manager, body.previous_response_id, owner
                )
                if index != len(messages) - 1:
                    if messages[-1].role == "user":
                        raise ConversationBusy("a turn of this conversation is in progress")
                    latest = response_id(conversation_id, messages[-1].id)
                    raise ResponseNotLatest(
                        f"response {body.previous_response_id} is not the latest of its conversation"
                        f" ({latest} is): chatsse conversations are linear"
                    )
            try:
                turn = await manager.begin_turn(conversation_id, text, owner=owner)
            except ConversationNotFound:
                missing = f"Previous response with id '{body.previous_response_id}' not found."
                raise ResponseNotFound(missing) from None
            head.id, head.item_id = response_id(turn.conversation_id, turn.reply_id), turn.reply_id
            head.created_at = turn.user_message.created_at
            return Begun(system + turn.prompt, StoredReply(manager, turn), partial(manager.abandon, turn))

        async def begin_unstored() -> Begun:
            history: list[Message] = []
            if body.previous_response_id is not None:
                _, messages, index = await _history_to(manager, body.previous_response_id, owner)
                history = messages[: index + 1][-(settings.max_history_length - 1) :]
            head.id, head.item_id = new_id("resp_"), new_id("msg_")
            user = Message(new_id("msg_"), "user", text, head.created_at)
            return Begun([*system, *history, user], Unstored())

        def reply_format(begun: Begun) -> ResponseEvents | ResponseBody:
            return ResponseEvents(head) if body.stream else ResponseBody(head)

        limit = settings.max_reply_tokens
        return await open_turn(
            state,
            scope,
            begin=begin_stored if body.store else begin_unstored,
            reply_format=reply_format,
            max_tokens=min(body.max_output_tokens or limit, limit),
            options=body.options(),
            buffered=not body.stream,
            replay_front=FRONT if body.stream and settings.replay_log else None,
        )


async def stored_response(manager: ConversationManager, model: str, value: str, owner: str) -> dict[str, Any]:
    """``GET /v1/responses/{id}``: a stored response (``owner``'s), rebuilt from its conversation."""
    conversation_id, messages, index = await _history_to(manager, value, owner)
    reply = messages[index]
    asked = messages[index - 1] if index > 0 else None
    previous = next((m for m in reversed(messages[: max(index - 1, 0)]) if m.role == "assistant"), None)
    head = ResponseHead(
        id=value,
        item_id=reply.id,
        model=model,
        created_at=asked.created_at if asked is not None else reply.created_at,
        previous_response_id=None if previous is None else response_id(conversation_id, previous.id),
    )
    finish: FinishReason = reply.finish_reason or "stop"
    if finish in _STATUS:
        status, why = _STATUS[finish]
        return head.object(status, text=reply.content, incomplete=why)
    return head.object(
        "failed", text=reply.content, error={"code": finish, "message": f"the reply ended: {finish}"}
    )
