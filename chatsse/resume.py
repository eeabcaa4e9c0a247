"""Resuming and stopping a reply's stream, from any worker (README, "Resuming and stopping").

- ``GET /conversations/{id}/messages/{message_id}/events``: a ``POST /chat`` stream's events
  after ``Last-Event-ID`` (the header, or ``?last_event_id=`` for clients that cannot set
  headers; none: from the start).
- ``POST /conversations/{id}/messages/{message_id}/stop``: end a streaming reply now; it is
  stored with ``finish_reason: "stopped"``, and every reader of it gets ``completed`` with
  that finish reason.

The events are read from the reply's replay log in the store (chatsse/replay/), then its live
tail until its last event, on whichever worker answers: the worker producing the reply writes
its log every ``CHATSSE_REPLAY_FLUSH_INTERVAL`` seconds, and this one reads it as often. A
resume after the end replays to the end and closes. The Responses API resumes the same way
(``GET /v1/responses/{id}?stream=true&starting_after=``, chatsse/openai/responses.py): each
front renders the log's items as its own events (a :class:`ReplayRenderer`).

The events are the ones the first stream sent: the opening and the last event as they were,
each token's event encoded again from its text. A reply that sent no last event of its own
(its client went away) ends with an error of type ``interrupted``; a log that stops growing,
its worker silent for longer than three heartbeats, ends with ``stream_lost``; a store that
fails under the reader holds the stream up as long, then ends it with ``storage_error``. Before the
stream: 404 ``replay_not_found`` (no such reply in that conversation, or an id of another
reply), 410 ``replay_expired`` (the reply is stored but its log is gone).

While a client reads a reply that is still streaming, it signals the producing worker
(``resumed``, chatsse/replay/signals.py) every third of ``CHATSSE_RESUME_WINDOW``: a reply
whose own client went away keeps generating while someone resumes it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Header, Query, Request
from starlette.responses import JSONResponse, Response

from chatsse import protocol
from chatsse.auth import caller_of
from chatsse.chat import FRONT, message_event
from chatsse.errors import ConversationNotFound, ReplayExpired, ReplayNotFound, StorageUnavailable
from chatsse.lifecycle import NEXT_TOKEN, Slot
from chatsse.logs import get_logger
from chatsse.models import ErrorBody, Message, StopOut
from chatsse.protocol import ENDINGS, Outcome
from chatsse.replay import Replay
from chatsse.replay.recorder import FOLLOW_SPAN
from chatsse.replay.signals import RESUMED, STOP
from chatsse.sse import Emit, EventStreamResponse, dumps, encode_event
from chatsse.state import AppState

__all__ = [
    "ChatReplay",
    "ReplayRenderer",
    "ResumeStream",
    "StoppedReply",
    "add_resume_routes",
    "find_replay",
    "stop_reply",
]

log = get_logger("chatsse.resume")

_READ_LIMIT = 500  # items per read of the log
_STALE_HEARTBEATS = 3.0  # a log silent this many writer heartbeats: its writer is gone
_STOP_POLL = 0.01  # seconds between two looks at a stopping reply's log
_LATE_LOG = 5.0  # seconds after a reply is stored that its log may still be on its way
_LATE_POLL = 0.1
_STOP_RESEND = 0.25  # seconds before a stop not yet acted on is sent again
_STOP_WAIT = 5.0  # seconds a stop waits for the reply to end before it answers 202
_STORAGE_ERROR = ENDINGS["storage_error"].error_type or "storage_error"


class ReplayRenderer(Protocol):
    """How one front writes a replay log's items as its events."""

    after: int  # the log position the client has seen (-1: none)

    def event(self, position: int, item: str, last: bool) -> bytes:
        """The event(s) for the item at ``position``; ``last``: the stream's last event."""
        ...

    def error(self, error_type: str, message: str, position: int) -> bytes:
        """A last event of the resumed stream's own, at ``position``."""
        ...


class ChatReplay:
    """``POST /chat`` streams: item ``i`` is the event with id ``<message id>:<i>``."""

    def __init__(self, message_id: str, after: int) -> None:
        self.message_id = message_id
        self.after = after

    def event(self, position: int, item: str, last: bool) -> bytes:
        if position == 0 or last:
            return item.encode()  # the opening and the last event, as they were sent
        return message_event(self.message_id, position, item)

    def error(self, error_type: str, message: str, position: int) -> bytes:
        data: protocol.ErrorData = {"type": error_type, "message": message, "message_id": self.message_id}
        return encode_event(protocol.ERROR, dumps(data), id=protocol.event_id(self.message_id, position))


class ResumeStream:
    """The producer of a resumed stream (module docstring)."""

    def __init__(
        self,
        state: AppState,
        slot: Slot,
        reply_id: str,
        renderer: ReplayRenderer,
        first: Replay,
        stale_after: float,
    ) -> None:
        self.log = state.replay
        self.signals = state.signals
        self.window = state.settings.resume_window
        self.slot = slot
        self.reply_id = reply_id
        self.renderer = renderer
        self.after = renderer.after  # the position of the last event sent
        self.first = first
        self.stale_after = stale_after
        self._signalled = -float("inf")
        # Signals renew the producer's window (a third of it) and its quick writes (FOLLOW_SPAN);
        # a reader waits on the log no longer than it may go without signalling.
        self._signal_every = min(self.window / 3, FOLLOW_SPAN / 2) if self.window > 0 else FOLLOW_SPAN / 2
        self._wait = min(stale_after, self._signal_every)

    async def _signal_resumed(self) -> None:
        """Tell the producer a client reads its log: it writes its log at once and often
        while followed (``FOLLOW_SPAN``), and keeps generating for its resume window."""
        now = time.monotonic()
        if now - self._signalled >= self._signal_every:
            self._signalled = now
            try:
                await self.signals.send(self.reply_id, RESUMED)
            except StorageUnavailable as exc:
                log.warning("resume_signal_failed", reply_id=self.reply_id, error=exc.message)

    async def run(self, emit: Emit) -> bytes:
        replay: Replay | None = self.first
        renderer = self.renderer
        self.slot.phase = NEXT_TOKEN  # waiting on the log is waiting on a token: same deadlines
        while True:
            if replay is None:
                return renderer.error(protocol.STREAM_LOST, "the reply's replay log is gone", self.after + 1)
            items = replay.items
            for index, item in enumerate(items):
                position = replay.first + index
                last = replay.done and position == replay.length - 1
                event = renderer.event(position, item, last)
                self.after = position
                if last:
                    return event  # the last event goes out with the end of the body
                self.slot.wrote = True
                if event:
                    await emit(event)
            if replay.complete:
                return b""
            await self._signal_resumed()
            if not items:
                if replay.age > self.stale_after:
                    silent = f"{replay.age:.1f} s"
                    return renderer.error(
                        protocol.STREAM_LOST,
                        f"the worker streaming this reply stopped writing it {silent} ago",
                        self.after + 1,
                    )
                await self.log.wait(self.reply_id, replay.length, within=self._wait)
            try:
                replay = await self._read()
            except StorageUnavailable as exc:
                message = f"the store failed while this reply's stream was read: {exc.message}"
                return renderer.error(_STORAGE_ERROR, message, self.after + 1)

    async def _read(self) -> Replay | None:
        """The log after the last event sent. A store that fails is asked again, every wait,
        until it has failed for as long as a silent log is given (``StorageUnavailable`` then):
        a short outage (Redis restarting) holds the stream up rather than ending it."""
        failing_since: float | None = None
        while True:
            try:
                return await self.log.read(self.reply_id, self.after, limit=_READ_LIMIT)
            except StorageUnavailable:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since > self.stale_after:
                    raise
            await asyncio.sleep(self._wait)

    async def stopped(self, reason: Outcome) -> bytes | None:
        ending = ENDINGS[reason]
        if ending.error_type is None or self.slot.disconnected:
            return None
        return self.renderer.error(ending.error_type, ending.meaning, self.after + 1)

    async def close(self) -> None:
        self.slot._lifecycle.release(self.slot)


def stale_after(state: AppState) -> float:
    """How long a log may go unwritten before a reader takes its writer for gone."""
    return _STALE_HEARTBEATS * state.recorder.heartbeat + state.settings.replay_flush_interval


async def find_replay(
    state: AppState, conversation_id: str, message_id: str, front: str, after: int = -1, *, owner: str
) -> Replay:
    """The reply's log from ``after``; ``ReplayNotFound`` or ``ReplayExpired`` if there is none.
    A log is its conversation's: of a conversation that ``owner`` does not have, not found."""
    settings, replay_log = state.settings, state.replay
    if not settings.replay_log:
        raise ReplayNotFound("this server keeps no replay logs (CHATSSE_REPLAY_LOG=false)")
    if await state.manager.get(conversation_id, owner=owner) is None:
        raise ReplayNotFound(f"no reply stream {message_id} in conversation {conversation_id}")
    first = await replay_log.read(message_id, after, limit=_READ_LIMIT)
    if first is None:  # a stream that began an instant ago may not be written yet
        await asyncio.sleep(2 * settings.replay_flush_interval)
        first = await replay_log.read(message_id, after, limit=_READ_LIMIT)
    if first is None:
        first = await _late_log(state, conversation_id, message_id, after, owner)
    if first is None or first.meta.conversation_id != conversation_id or first.meta.front != front:
        if first is None and await _stored(state, conversation_id, message_id, owner) is not None:
            raise ReplayExpired(
                f"reply {message_id} is stored, but its stream is no longer kept"
                f" (CHATSSE_REPLAY_TTL = {settings.replay_ttl:g} s): read the conversation"
            )
        raise ReplayNotFound(f"no reply stream {message_id} in conversation {conversation_id}")
    return first


async def _late_log(
    state: AppState, conversation_id: str, message_id: str, after: int, owner: str
) -> Replay | None:
    """The log of a reply whose log's first write is still on its way (a busy store): of a
    reply stored an instant ago, looked for until ``_LATE_LOG`` seconds after it was stored;
    of a turn still in progress (its user message is the conversation's last), for
    ``_LATE_LOG`` seconds from now. None otherwise: no such reply, or its log has expired."""
    try:
        messages = await state.manager.messages(conversation_id, owner=owner)
    except ConversationNotFound:
        return None
    stored = next((m for m in messages if m.id == message_id), None)
    if stored is not None:
        # A log lives CHATSSE_REPLAY_TTL after its last write, which came after the reply was
        # stored: until then, a missing log is late, not gone.
        until = stored.created_at + min(_LATE_LOG, state.settings.replay_ttl)
    elif messages and messages[-1].role == "user":  # a turn in progress: maybe this one
        until = time.time() + _LATE_LOG
    else:
        return None
    while time.time() < until:
        await asyncio.sleep(_LATE_POLL)
        found = await state.replay.read(message_id, after, limit=_READ_LIMIT)
        if found is not None:
            return found
    return None


def resume_response(state: AppState, reply_id: str, renderer: ReplayRenderer, first: Replay) -> Response:
    slot = state.lifecycle.admit()
    return EventStreamResponse(ResumeStream(state, slot, reply_id, renderer, first, stale_after(state)), slot)


@dataclass(frozen=True, slots=True)
class StoppedReply:
    """What a stop found: the stored reply once it ended (None: it did not end in time)."""

    message: Message | None
    stopped: bool  # this stop ended it (else it had ended already)


async def stop_reply(
    state: AppState, conversation_id: str, message_id: str, front: str, *, owner: str
) -> StoppedReply:
    """Signal the worker streaming the reply to stop it, and wait (bounded) until it has ended
    and is stored. ``ReplayNotFound`` for a reply that is not there."""
    replay_log = state.replay
    try:
        replay = await find_replay(state, conversation_id, message_id, front, owner=owner)
    except ReplayExpired:  # ended long ago: stored, and its log gone
        return StoppedReply(await _stored(state, conversation_id, message_id, owner), stopped=False)
    if replay.done:
        return StoppedReply(await _stored(state, conversation_id, message_id, owner), stopped=False)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _STOP_WAIT
    while loop.time() < give_up:
        await state.signals.send(message_id, STOP)
        resend = min(give_up, loop.time() + _STOP_RESEND)
        while loop.time() < resend:
            await asyncio.sleep(_STOP_POLL)
            seen = await replay_log.read(message_id, replay.length - 1, limit=1)
            if seen is None or seen.done:
                message = await _stored(state, conversation_id, message_id, owner)
                stopped = message is not None and message.finish_reason == "stopped"
                return StoppedReply(message, stopped)
            if seen.age > stale_after(state):  # its worker is gone: nothing left to stop
                return StoppedReply(None, stopped=False)
            replay = seen
    return StoppedReply(None, stopped=False)


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
_STOP_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": StopOut, "description": "The reply has ended (stopped by this call, or before it)."},
    202: {"model": StopOut, "description": "Stop sent; the reply's worker has not confirmed it yet."},
    404: {"model": ErrorBody, "description": "No such reply stream in this conversation."},
    503: {"model": ErrorBody, "description": "The store is unavailable."},
}


def add_resume_routes(app: FastAPI, state: AppState) -> None:
    @app.get(protocol.resume_path("{conversation_id}", "{message_id}"), responses=_RESPONSES)
    async def resume_stream(
        request: Request,
        conversation_id: str,
        message_id: str,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id: Annotated[
            str | None, Query(description="Last-Event-ID, for clients that cannot set it")
        ] = None,
    ) -> Response:
        after = _after(message_id, last_event_id_header or last_event_id)
        owner = caller_of(request.scope).owner
        first = await find_replay(state, conversation_id, message_id, FRONT, after, owner=owner)
        return resume_response(state, message_id, ChatReplay(message_id, after), first)

    @app.post(protocol.stop_path("{conversation_id}", "{message_id}"), responses=_STOP_RESPONSES)
    async def stop_stream(request: Request, conversation_id: str, message_id: str) -> Response:
        """Stop a streaming reply, from any worker; it is stored as ``stopped``."""
        owner = caller_of(request.scope).owner
        result = await stop_reply(state, conversation_id, message_id, FRONT, owner=owner)
        message = result.message
        body = StopOut(
            conversation_id=conversation_id,
            message_id=message_id,
            stopped=result.stopped,
            finish_reason=None if message is None else message.finish_reason,
            content=None if message is None else message.content,
        )
        return JSONResponse(body.model_dump(), status_code=200 if message is not None else 202)


async def _stored(state: AppState, conversation_id: str, message_id: str, owner: str) -> Message | None:
    try:
        messages = await state.manager.messages(conversation_id, owner=owner)
    except ConversationNotFound:
        return None
    return next((m for m in messages if m.id == message_id), None)
