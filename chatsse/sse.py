"""The event wire format of ``POST /chat``, and the response that streams it.

Every event chatsse sends is encoded here, straight to bytes::

    id: <stream id>:<seq>
    event: <name>
    retry: <ms>                (``connected`` only)
    data: <one line of JSON>

Event ids are ``<assistant message id>:<position>``, the position counting from 0 at
``connected``. Data is always one line of JSON, so no field ever needs splitting.

Deliberate divergences from plain ``sse_starlette.EventSourceResponse`` usage
-----------------------------------------------------------------------------
:class:`EventStreamResponse` subclasses sse-starlette's response and keeps its task
structure (keepalive pings, the disconnect listener, the shutdown watcher) but replaces
``_stream_response``:

1. Instead of iterating a body iterator of ``ServerSentEvent`` objects, it awaits a
   *producer* coroutine that writes pre-encoded bytes through ``emit``. No per-event
   object, no per-event ``ensure_bytes`` copy, no per-event debug log call.
2. ``emit`` calls the ASGI ``send`` directly. sse-starlette wraps every send in
   ``anyio.move_on_after(send_timeout)``, a cancel scope per event even when no timeout
   is set; ``scripts/bench_sse.py`` measures that cost. chatsse bounds a stream's life with
   one deadline per stream (``CHATSSE_REQUEST_TIMEOUT``) instead.
3. The producer is a plain coroutine, not an async generator, so a deadline can wrap the
   whole stream without yielding across a cancel scope.
4. Shutdown is per app, not per process: sse-starlette's exit watcher reads a process-global
   flag that is never reset, so after one server in a process has shut down, every stream of
   the next one would end at once. chatsse's streams watch their own app's ``draining``
   event instead, and end with a final event rather than a silent cut.
5. Events skip the ``send`` wrappers of the middleware stack. Starlette's error and
   exception middleware and chatsse's request middleware each wrap ``send`` to see the
   response start; every event would pass through all of them. The response start goes
   through them as usual, so they all know the response has begun; the body events go
   straight to the server's ``send``, which the app leaves in the scope before any
   middleware runs (``chatsse.body_send``, see ``ChatsseApp`` in chatsse/app.py).
   Middleware that rewrites bodies (compression, which SSE must not have anyway) would be
   bypassed; chatsse installs none.

This overrides a private method, so the sse-starlette version is pinned to one major
release in ``pyproject.toml``; ``tests/test_sse.py`` checks the behaviour it relies on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring

Emit = Callable[[bytes], Awaitable[None]]
BODY_SEND_SCOPE_KEY = "chatsse.body_send"
Producer = Callable[[Emit], Awaitable[None]]


def dumps(data: Any) -> str:
    """Compact JSON on one line (JSON escapes CR and LF, so it is always one SSE line)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


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


class StreamEncoder:
    """Encodes the events of one stream, numbering their ids.

    ``delta`` is the per-token hot path: one f-string, one C-level JSON string escape,
    one UTF-8 encode.
    """

    __slots__ = ("_prefix", "seq", "stream_id")

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self._prefix = f"id: {stream_id}:"
        self.seq = 0

    def _next_id(self) -> str:
        seq = self.seq
        self.seq = seq + 1
        return f"{self.stream_id}:{seq}"

    def event(self, event: str, data: Any, *, retry: int | None = None) -> bytes:
        return encode_event(event, dumps(data), id=self._next_id(), retry=retry)

    def delta(self, text: str) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return (
            f'{self._prefix}{seq}\nevent: message\ndata: {{"delta":{_encode_json_string(text)}}}\n\n'
        ).encode()


class _NoBody:
    """Placeholder body iterator: :class:`EventStreamResponse` never iterates it."""

    def __aiter__(self) -> _NoBody:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


def _keepalive() -> ServerSentEvent:
    return ServerSentEvent(comment="keepalive", sep="\n")


class EventStreamResponse(EventSourceResponse):
    """An sse-starlette response whose body is written by ``producer(emit)``.

    Shutdown: when ``draining`` is set, the stream may run on for ``grace_period`` seconds;
    if it has not finished by then, the producer is cancelled and ``on_shutdown(emit)``
    writes the stream's last event. sse-starlette's own exit watcher (a process-global flag
    that, once set, ends every later stream in the process too) is not used.
    """

    def __init__(
        self,
        producer: Producer,
        *,
        headers: Mapping[str, str] | None = None,
        ping: float = 15.0,
        on_close: Callable[[], Awaitable[None]] | None = None,
        draining: anyio.Event | None = None,
        grace_period: float = 0.0,
        on_shutdown: Callable[[Emit], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            _NoBody(),
            headers={"Cache-Control": "no-cache", **(headers or {})},
            ping=ping,
            sep="\n",
            ping_message_factory=_keepalive,
        )
        self._producer = producer
        self._on_close = on_close
        self._draining = draining
        self._grace_period = grace_period
        self._on_shutdown = on_shutdown
        self._producer_scope = anyio.CancelScope()
        self._produced = anyio.Event()

    async def _stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body_send = self._body_send or send

        async def emit(chunk: bytes) -> None:
            await body_send({"type": "http.response.body", "body": chunk, "more_body": True})

        with self._producer_scope:
            await self._producer(emit)
        self._produced.set()
        if self._producer_scope.cancelled_caught and self._on_shutdown is not None:
            await self._on_shutdown(emit)
        async with self._send_lock:
            self.active = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _listen_for_exit_signal_with_grace(self) -> None:
        if self._draining is None:
            await anyio.sleep_forever()
            return
        await self._draining.wait()
        with anyio.move_on_after(self._grace_period):
            await self._produced.wait()
        if not self._produced.is_set():
            self._producer_scope.cancel()
        # Returning would cancel the whole response; _stream_response ends it instead.
        await anyio.sleep_forever()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._body_send: Send | None = scope.get(BODY_SEND_SCOPE_KEY)
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                await self._on_close()
