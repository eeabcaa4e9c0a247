"""The event wire format of ``POST /chat``, and the response that streams it.

Every event chatsse sends is encoded here, straight to bytes::

    id: <stream id>:<seq>
    event: <name>
    retry: <ms>                (``connected`` only)
    data: <one line of JSON>

Event ids are ``<assistant message id>:<position>``, the position counting from 0 at
``connected``. Data is always one line of JSON, so no field ever needs splitting.

Why not ``sse_starlette.EventSourceResponse``
--------------------------------------------
chatsse's :class:`EventStreamResponse` does the same jobs as sse-starlette's response
(keepalive comments, cancelling the stream when the client goes away, ending streams on
shutdown) with less work per event and per response; ``make bench`` and
``scripts/bench_sse.py`` measure both:

1. Per response, sse-starlette runs an anyio task group of four tasks (the body, pings,
   the disconnect listener, the exit watcher). chatsse runs two plain asyncio tasks: one
   writing the body (shallow, so a wake-up between tokens resumes a few coroutines, not the
   twenty of the request's task) and one waiting on ``receive``. Keepalive and shutdown are
   jobs of the app's :class:`StreamRegistry`: one ticker and one drain for all streams.
2. The body is written by a *producer* coroutine through ``emit(bytes)``: events are
   encoded straight to bytes (no ``ServerSentEvent`` object per event) and each goes to the
   ASGI ``send`` directly. sse-starlette wraps every send in ``anyio.move_on_after``, a
   cancel scope per event; chatsse bounds a stream with one deadline
   (``CHATSSE_REQUEST_TIMEOUT``, in chatsse/chat.py).
3. Shutdown is per app: sse-starlette's exit watcher reads a process-global flag that is
   never reset, so after one server in a process has shut down every stream of the next one
   would end at once. chatsse's registry drains its own app's streams, and each ends with a
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
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring

Emit = Callable[[bytes], Awaitable[None]]
BODY_SEND_SCOPE_KEY = "chatsse.body_send"
# A producer writes a stream's events through ``emit`` and may return its last event, which
# then goes out in the same write as the end of the body.
Producer = Callable[[Emit], Awaitable[bytes | None]]


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


_KEEPALIVE: Final = b": keepalive\n\n"
_SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class OpenStream:
    """One response in flight: what its app's :class:`StreamRegistry` needs to reach it."""

    __slots__ = (
        "_receive", "_send", "_waiter", "cancel_scope", "closed", "disconnected", "ping_task", "shut_down",
        "wrote",
    )  # fmt: skip

    def __init__(self, send: Send, receive: Receive) -> None:
        self._send = send
        self._receive = receive
        self._waiter: asyncio.Future[Message] | None = None
        self.cancel_scope = anyio.CancelScope()
        self.wrote = False  # an event went out since the keepalive ticker last looked
        self.ping_task: asyncio.Task[None] | None = None
        self.closed = False  # the last body message is being sent or has been
        self.disconnected = False
        self.shut_down = False

    def emit(self, chunk: bytes) -> Awaitable[None]:
        """The hot path: one flag, one dict, and the server's ``send`` for the caller to await
        (a plain function: no coroutine of its own between the producer and the server)."""
        self.wrote = True
        return self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def finish(self, last: bytes | None = None) -> None:
        self.closed = True
        await self._send({"type": "http.response.body", "body": last or b"", "more_body": False})

    async def ping(self) -> None:
        try:
            if not self.closed:
                await self._send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
        except Exception:  # the response ended while the ping waited to be written
            pass
        finally:
            self.ping_task = None

    def listen(self) -> None:
        """Wait, in a task of its own, for the client to go away."""
        self._waiter = waiter = asyncio.ensure_future(self._receive())
        waiter.add_done_callback(self._received)

    def stop_listening(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()

    def _received(self, waiter: asyncio.Future[Message]) -> None:
        if waiter.cancelled() or self.closed:
            return
        if waiter.exception() is None and waiter.result()["type"] != "http.disconnect":
            self.listen()  # more request body nobody asked for: keep listening
            return
        self.disconnected = True
        self.cancel_scope.cancel()

    def shutdown(self) -> None:
        if not self.closed and not self.disconnected:
            self.shut_down = True
            self.cancel_scope.cancel()


class StreamRegistry:
    """The open event streams of one app, and the two jobs done for all of them at once.

    - Keepalive: one ticker task, alive only while streams are open, wakes every half
      interval and writes a comment to each stream that sent nothing since the last tick,
      so no stream is silent for longer than the interval.
    - Shutdown: :meth:`drain` gives the open streams the grace period, then cancels the
      producers of those still running; each writes its final event (``on_shutdown``).

    Per-app, not per-process (unlike sse-starlette's exit flag), and no task per stream for
    either job.
    """

    def __init__(self, keepalive_interval: float = 15.0) -> None:
        self.keepalive_interval = keepalive_interval
        self._streams: set[OpenStream] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._emptied: asyncio.Event | None = None  # made when a drain starts

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: OpenStream) -> None:
        self._streams.add(stream)
        if self._ticker is None:
            self._ticker = asyncio.ensure_future(self._keepalive())

    def discard(self, stream: OpenStream) -> None:
        self._streams.discard(stream)
        if not self._streams and self._emptied is not None:
            self._emptied.set()

    async def _keepalive(self) -> None:
        try:
            while self._streams:
                await asyncio.sleep(self.keepalive_interval / 2)
                for stream in list(self._streams):
                    if stream.wrote:
                        stream.wrote = False
                    elif stream.ping_task is None and not stream.closed:
                        stream.ping_task = asyncio.ensure_future(stream.ping())
        finally:
            self._ticker = None

    def drain(self, grace_period: float) -> None:
        """Start the graceful end of every open stream (call in the server's event loop)."""
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain(grace_period))

    async def _drain(self, grace_period: float) -> None:
        self._emptied = asyncio.Event()
        if self._streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), grace_period)
        for stream in list(self._streams):
            stream.shutdown()

    async def aclose(self) -> None:
        """Stop the background tasks (the app's lifespan ends)."""
        for task in (self._ticker, self._drainer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class EventStreamResponse(Response):
    """An ASGI response whose ``text/event-stream`` body is written by ``producer(emit)``
    (and, when the producer returns one, its last event).

    Per response: the ``http.response.start`` message, one task waiting on ``receive`` for
    the client to go away (which cancels the producer), and one task writing the body.
    Keepalive and shutdown are the registry's. ``on_shutdown(emit)``
    writes the stream's last event when the registry's drain cancels the producer;
    ``on_close()`` runs once, however the response ends.
    """

    def __init__(
        self,
        producer: Producer,
        registry: StreamRegistry,
        *,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[Emit], Awaitable[None]] | None = None,
    ) -> None:
        self.producer = producer
        self.registry = registry
        self.raw_headers = list(_SSE_HEADERS)  # a list of its own: middleware may edit it
        if headers:
            extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            self.raw_headers = [*_SSE_HEADERS, *extra]
        self.on_close = on_close
        self.on_shutdown = on_shutdown
        self.status_code = 200
        self.background = None  # Response's; FastAPI may attach background tasks here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            stream = OpenStream(scope.get(BODY_SEND_SCOPE_KEY) or send, receive)
            stream.listen()
            self.registry.add(stream)
            try:
                # The body is written from a task of its own. The request's task is some twenty
                # coroutines deep (server, middleware, routing); every wake-up between tokens
                # would resume all of them. Cancelling this task (server shutdown) cancels the
                # body's task too.
                await asyncio.ensure_future(self._write_body(stream))
            finally:
                self.registry.discard(stream)
                stream.stop_listening()
        finally:
            if self.on_close is not None:
                await self.on_close()
        if self.background is not None:
            await self.background()

    async def _write_body(self, stream: OpenStream) -> None:
        last = None
        with stream.cancel_scope:
            last = await self.producer(stream.emit)
        if stream.shut_down and stream.cancel_scope.cancelled_caught and self.on_shutdown is not None:
            await self.on_shutdown(stream.emit)
        if not stream.disconnected:
            await stream.finish(last)
