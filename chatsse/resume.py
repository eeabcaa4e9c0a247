"""Resuming a ``POST /chat`` stream: ``GET /conversations/{id}/messages/{message_id}/events``.

The stream's events after ``Last-Event-ID`` (the header, or ``?last_event_id=`` for clients
that cannot set headers; none: from the start), read from the reply's replay log in the store
(chatsse/replay/), then its live tail until its last event, on whichever worker answers: the
worker producing the reply writes its log every ``CHATSSE_REPLAY_FLUSH_INTERVAL`` seconds,
and this one reads it as often. A resume after the end replays to the end and closes.

The events are the ones the first stream sent, with the same ids: the opening and the last
event as they were, each token's ``message`` event encoded again from its text. A reply that
sent no last event of its own (its client went away) ends with ``event: error`` of type
``interrupted``; a log that stops growing, its worker silent for longer than three heartbeats,
ends with ``stream_lost``. Before the stream: 404 ``replay_not_found`` (no such reply in that
conversation, or an id of another reply), 410 ``replay_expired`` (the reply is stored but its
log is gone).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query
from starlette.responses import Response

from chatsse import protocol
from chatsse.chat import FRONT, message_event
from chatsse.errors import ConversationNotFound, ReplayExpired, ReplayNotFound
from chatsse.lifecycle import NEXT_TOKEN, Slot
from chatsse.models import ErrorBody
from chatsse.protocol import ENDINGS, Outcome
from chatsse.replay import Replay, ReplayLog
from chatsse.sse import Emit, EventStreamResponse, dumps, encode_event
from chatsse.state import AppState

__all__ = ["ResumeStream", "add_resume_route"]

_READ_LIMIT = 500  # items per read of the log
_STALE_HEARTBEATS = 3.0  # a log silent this many writer heartbeats: its writer is gone


class ResumeStream:
    """The producer of a resumed stream (module docstring)."""

    def __init__(
        self,
        replay_log: ReplayLog,
        slot: Slot,
        message_id: str,
        after: int,
        first: Replay,
        stale_after: float,
    ) -> None:
        self.log = replay_log
        self.slot = slot
        self.message_id = message_id
        self.after = after  # the position of the last event sent
        self.first = first
        self.stale_after = stale_after

    def _event(self, position: int, item: str, replay: Replay) -> bytes:
        if position == 0 or (replay.done and position == replay.length - 1):
            return item.encode()  # the opening and the last event, as they were sent
        return message_event(self.message_id, position, item)

    def _error(self, error_type: str, message: str) -> bytes:
        data: protocol.ErrorData = {"type": error_type, "message": message, "message_id": self.message_id}
        return encode_event(
            protocol.ERROR, dumps(data), id=protocol.event_id(self.message_id, self.after + 1)
        )

    async def run(self, emit: Emit) -> bytes:
        replay: Replay | None = self.first
        self.slot.phase = NEXT_TOKEN  # waiting on the log is waiting on a token: same deadlines
        while True:
            if replay is None:
                return self._error(protocol.STREAM_LOST, "the reply's replay log is gone")
            items = replay.items
            for index, item in enumerate(items):
                position = replay.first + index
                event = self._event(position, item, replay)
                self.after = position
                if replay.complete and index == len(items) - 1:
                    return event  # the last event goes out with the end of the body
                self.slot.wrote = True
                await emit(event)
            if replay.complete:
                return b""
            if not items:
                if replay.age > self.stale_after:
                    silent = f"{replay.age:.1f} s"
                    return self._error(
                        protocol.STREAM_LOST,
                        f"the worker streaming this reply stopped writing it {silent} ago",
                    )
                await self.log.wait(self.message_id, replay.length, within=self.stale_after)
            replay = await self.log.read(self.message_id, self.after, limit=_READ_LIMIT)

    async def stopped(self, reason: Outcome) -> bytes | None:
        ending = ENDINGS[reason]
        if ending.error_type is None or self.slot.disconnected:
            return None
        return self._error(ending.error_type, ending.meaning)

    async def close(self) -> None:
        lifecycle = self.slot._lifecycle
        lifecycle.release(self.slot)


def _after(message_id: str, last_event_id: str | None) -> int:
    """The position to resume after (-1: from the start); ``ReplayNotFound`` for an id of
    another reply, or not an event id at all."""
    if not last_event_id:
        return -1
    try:
        stream, position = protocol.parse_event_id(last_event_id)
    except ValueError:
        raise ReplayNotFound(f"Last-Event-ID {last_event_id!r} is not an event id of this server") from None
    if stream != message_id:
        raise ReplayNotFound(
            f"Last-Event-ID {last_event_id!r} is an event of another reply, not {message_id}"
        )
    return position


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The stream's events after Last-Event-ID."},
    404: {
        "model": ErrorBody,
        "description": "No such reply in this conversation, or an event id of another.",
    },
    410: {"model": ErrorBody, "description": "The reply is stored, but its replay log has expired."},
    503: {"model": ErrorBody, "description": "Too many open streams, draining, or the store unavailable."},
}


def add_resume_route(app: FastAPI, state: AppState) -> None:
    replay_log, lifecycle = state.replay, state.lifecycle
    stale_after = _STALE_HEARTBEATS * state.recorder.heartbeat + state.settings.replay_flush_interval

    @app.get(protocol.resume_path("{conversation_id}", "{message_id}"), responses=_RESPONSES)
    async def resume_stream(
        conversation_id: str,
        message_id: str,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id: Annotated[
            str | None, Query(description="Last-Event-ID, for clients that cannot set it")
        ] = None,
    ) -> Response:
        if not state.settings.replay_log:
            raise ReplayNotFound("this server keeps no replay logs (CHATSSE_REPLAY_LOG=false)")
        after = _after(message_id, last_event_id_header or last_event_id)
        first = await replay_log.read(message_id, after, limit=_READ_LIMIT)
        if first is None:  # a stream that began an instant ago may not be written yet
            await asyncio.sleep(2 * state.settings.replay_flush_interval)
            first = await replay_log.read(message_id, after, limit=_READ_LIMIT)
        if first is None or first.meta.conversation_id != conversation_id or first.meta.front != FRONT:
            if first is None and await _stored(state, conversation_id, message_id):
                raise ReplayExpired(
                    f"reply {message_id} is stored, but its stream is no longer kept"
                    f" (CHATSSE_REPLAY_TTL = {state.settings.replay_ttl:g} s): read the conversation"
                )
            raise ReplayNotFound(f"no reply stream {message_id} in conversation {conversation_id}")
        slot = lifecycle.admit()
        return EventStreamResponse(
            ResumeStream(replay_log, slot, message_id, after, first, stale_after), slot
        )


async def _stored(state: AppState, conversation_id: str, message_id: str) -> bool:
    try:
        messages = await state.manager.messages(conversation_id)
    except ConversationNotFound:
        return False
    return any(m.id == message_id for m in messages)
