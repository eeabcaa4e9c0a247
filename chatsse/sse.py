"""Server-Sent Events on the wire: the encoding of one event, and the response that streams them.

An event is encoded straight to bytes (the names and ids it carries are chatsse/protocol.py's)::

    id: <id>
    event: <name>
    retry: <ms>                (when given)
    data: <one line of JSON>

Data is always one line of JSON (JSON escapes CR and LF), so no field ever needs splitting.

Why not ``sse_starlette.EventSourceResponse``
--------------------------------------------
chatsse's :class:`EventStreamResponse` does the same jobs as sse-starlette's response
(keepalive comments, cancelling the stream when the client goes away, ending streams on
shutdown) with less work per event and per response; ``make bench`` and
``scripts/bench_sse.py`` measure both:

1. Per response, sse-starlette runs an anyio task group of four tasks (the body, pings,
   the disconnect listener, the exit watcher). chatsse runs two plain asyncio tasks: one
   writing the body (shallow, so a wake-up between tokens resumes a few coroutines, not the
   twenty of the request's task) and one waiting on ``receive``. Keepalive, deadlines and
   shutdown are jobs of the app's :class:`~chatsse.lifecycle.Lifecycle`: one ticker and one
   drain for all streams.
2. The body is written by a *producer* through ``emit(bytes)``: events are encoded straight
   to bytes (no ``ServerSentEvent`` object per event) and each goes to the ASGI ``send``
   directly. sse-starlette wraps every send in ``anyio.move_on_after``, a cancel scope per
   event; chatsse's lifecycle checks every deadline of every stream once a tick.
3. Shutdown is per app: sse-starlette's exit watcher reads a process-global flag that is
   never reset, so after one server in a process has shut down every stream of the next one
   would end at once. chatsse's lifecycle drains its own app's streams, and each ends with a
   final event rather than a silent cut.
4. Events skip the ``send`` wrappers of the middleware stack. Starlette's error and
   exception middleware and chatsse's request middleware each wrap ``send`` to see the
   response start; every event would pass through all of them. The response start goes
   through them as usual; the body events go straight to the server's ``send``, which the
   app leaves in the scope before any middleware runs (``chatsse.body_send``, see
   ``ChatsseApp`` in chatsse/app.py). Middleware that rewrites bodies (compression, which
   SSE must not have anyway) would be bypassed; chatsse installs none.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from chatsse.lifecycle import Slot

__all__ = [
    "BODY_SEND_SCOPE_KEY",
    "CollectedResponse",
    "Emit",
    "EventStreamResponse",
    "Producer",
    "dumps",
    "encode_event",
]

Emit = Callable[[bytes], Awaitable[None]]
BODY_SEND_SCOPE_KEY: Final = "chatsse.body_send"

SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


_encode: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(data: Any) -> str:
    """Compact JSON on one line (JSON escapes CR and LF, so it is always one SSE line)."""
    return _encode(data)


def encode_event(event: str, data: str, *, id: str | None = None, retry: int | None = None) -> bytes:
    """Encode one event. ``data`` must not contain CR or LF (JSON from :func:`dumps` never does)."""
    parts = []
    if id is not None:
        parts.append(f"id: {id}\n")
    parts.append(f"event: {event}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    parts.append(f"data: {data}\n\n")
    return "".join(parts).encode()


class Producer(Protocol):
    """What writes a stream's body (chatsse.turns.TurnStream is the one chatsse uses)."""

    async def run(self, emit: Emit) -> bytes:
        """Write the events; return the last one (it goes out with the end of the body)."""
        ...

    async def stopped(self, reason: Any) -> bytes | None:
        """The slot stopped ``run``: the last event for ``reason``, if one is to be sent."""
        ...

    async def close(self) -> None:
        """Called once when the response ends, however it ends."""
        ...


class EventStreamResponse(Response):
    """An ASGI response whose ``text/event-stream`` body ``producer`` writes, in the stream's
    :class:`~chatsse.lifecycle.Slot`.

    Per response: the ``http.response.start`` message, one task waiting on ``receive`` for the
    client to go away (it stops the producer), and one task writing the body.
    """

    def __init__(self, producer: Producer, slot: Slot, *, headers: Mapping[str, str] | None = None) -> None:
        self.producer = producer
        self.slot = slot
        self.raw_headers = list(SSE_HEADERS)  # a list of its own: middleware may edit it
        if headers:
            self.raw_headers += [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            ]
        self.status_code = 200
        self.background = None  # Response's; FastAPI may attach background tasks here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slot = self.slot
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            slot.attach(scope.get(BODY_SEND_SCOPE_KEY) or send, receive)
            try:
                # The body is written from a task of its own. The request's task is some twenty
                # coroutines deep (server, middleware, routing); every wake-up between tokens
                # would resume all of them. Cancelling this task (a forced server shutdown)
                # cancels the body's task too.
                await slot.loop.create_task(self._write_body())
            finally:
                slot.detach()
        finally:
            await self.producer.close()
        if self.background is not None:
            await self.background()

    async def _write_body(self) -> None:
        slot = self.slot
        last = await _produce(slot, self.producer)
        if not slot.disconnected:
            await slot.finish(last)


async def _produce(slot: Slot, producer: Producer) -> bytes | None:
    """Run the producer in the slot; its last event (``run``'s, or ``stopped``'s if the slot
    stopped it)."""
    last: bytes | None = None
    if slot.stop_reason is None:  # else the drain stopped it before it began
        slot.task = asyncio.current_task(slot.loop)
        try:
            last = await producer.run(slot.emit)
        except asyncio.CancelledError:
            if not slot.uncancel():  # a cancel from elsewhere (a forced server shutdown)
                raise
        finally:
            slot.task = None
    if last is None and slot.stop_reason is not None:
        last = await producer.stopped(slot.stop_reason)
    return last


async def _discard(message: Message) -> None:
    return None


class CollectedResponse(Response):
    """A turn answered in one body once it ends (a non-streaming request): the producer runs
    in its slot as for a stream, with every deadline and the disconnect watch, but its writes
    go nowhere; its last event is the whole JSON body, and ``status()``, asked once it ends,
    the response's status."""

    media_type = "application/json"

    def __init__(
        self,
        producer: Producer,
        slot: Slot,
        status: Callable[[], int],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.producer = producer
        self.slot = slot
        self.status = status
        self.background = None
        self.extra_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slot = self.slot
        try:
            slot.attach(_discard, receive)
            try:
                body = await slot.loop.create_task(_produce(slot, self.producer))
            finally:
                slot.closed = True
                slot.detach()
            if slot.disconnected:
                return
            status = self.status()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body or b"")).encode()),
                *self.extra_headers,
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body or b"", "more_body": False})
        finally:
            await self.producer.close()
