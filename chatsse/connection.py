"""What a client may send before the app answers, enforced on each HTTP/1.1 connection:
:class:`LimitedHttpProtocol` (uvicorn's httptools protocol with chatsse's limits) and
:func:`sweep`, which applies its time bounds.

uvicorn's httptools protocol bounds neither the time a client may take to send a request's
line and headers nor their size (its h11 protocol bounds a head still incomplete, to 16 KiB,
not the time):
against uvicorn 0.54, a connection that sends half a request, or nothing, is held for ever,
and a 1 MiB header is read and served. Every chatsse server command (``ChatsseServer``,
chatsse/serving.py) therefore serves with this protocol:

- a request's line and headers must arrive within ``CHATSSE_HEADER_TIMEOUT`` seconds of the
  connection's opening or of the request's first byte: else 408 and the connection is closed
  (a connection that never sent a byte is closed without an answer);
- they must fit in ``CHATSSE_MAX_HEADER_SIZE`` bytes and ``CHATSSE_MAX_HEADERS`` fields: else
  431 and the connection is closed, having buffered no more than that and one network read;
- a body must arrive within ``CHATSSE_BODY_TIMEOUT`` seconds of the end of its headers: the
  request middleware answers 408 in the front's shape (chatsse/middleware.py) when it reads a
  part of the body after that; a client that sends nothing more is woken up here (its
  request's ``receive`` returns an empty part), so the middleware gets to look;
- a body the app answered without reading (a 413 on its declared length, a route that takes
  none) is read and dropped for at most ``CHATSSE_HEADER_TIMEOUT`` seconds, and the
  connection is closed if no request follows it within as long (its bytes cancel uvicorn's
  keep-alive timeout, which nothing arms again: uvicorn alone keeps such a connection open
  for ever). An idle keep-alive connection is otherwise uvicorn's (``CHATSSE_KEEPALIVE``).

There is no timer per request or per connection: the server calls :func:`sweep` every
``Deadlines.sweep`` seconds, which counts, for each connection, the sweeps that found it
waiting in one phase, as the lifecycle's watchdog does for streams (chatsse/lifecycle.py). A
bound is therefore enforced between its value and two sweeps later. Per request the protocol
adds three method calls and a few attribute writes; the sweep costs one method call per open
connection.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from chatsse.deadlines import Deadlines
from chatsse.logs import get_logger
from chatsse.protocol import error_body_for
from chatsse.settings import Settings

__all__ = ["ConnectionLimits", "LimitedHttpProtocol", "connection_limits_of", "sweep"]

log = get_logger("chatsse.connection")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_headers: int
    sweep: float  # seconds between two sweeps
    header_sweeps: int  # sweeps that find a request's head waiting before it is cut
    body_sweeps: int  # sweeps that find a request's body waiting before its receive is woken

    @classmethod
    def from_settings(cls, settings: Settings, deadlines: Deadlines) -> ConnectionLimits:
        every = deadlines.sweep
        return cls(
            header_timeout=deadlines.header,
            body_timeout=deadlines.body,
            max_header_bytes=settings.max_header_size,
            max_headers=settings.max_headers,
            sweep=every,
            # The first sweep to see a phase may come just after it began, so one more.
            header_sweeps=math.ceil(deadlines.header / every) + 1,
            body_sweeps=math.ceil(deadlines.body / every) + 1,
        )


def connection_limits_of(app: Any) -> ConnectionLimits | None:
    """The connection limits of a chatsse app (None for any other ASGI app)."""
    limits = getattr(app, "connection_limits", None)
    return limits if isinstance(limits, ConnectionLimits) else None


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the limits of the module docstring. uvicorn builds
    one per connection (``functools.partial(LimitedHttpProtocol, limits=...)`` as its
    ``http`` option)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.in_head = True  # reading a request's line and headers, or waiting for them
        self.head_bytes = 0  # bytes read since the head began: its size, or more (a body read with it)
        self.head_sweeps = 0
        self.body_sweeps = 0

    def data_received(self, data: bytes) -> None:
        if not self.in_head:
            super().data_received(data)
            return
        self.head_bytes += len(data)
        super().data_received(data)
        # Still in the head past the limit: refuse now, before the parser buffers any more of it.
        over = self.in_head and self.head_bytes > self.limits.max_header_bytes
        if over and not self.transport.is_closing():
            self._refuse(431, "headers_too_large", self._too_large())

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_sweeps = self.body_sweeps = 0
        limits, most = self.limits, self.limits.max_header_bytes
        # head_bytes may count body bytes read with the head: only then is the head measured.
        if len(self.headers) > limits.max_headers or (
            self.head_bytes > most and _head_size(self.url, self.headers) > most
        ):
            # uvicorn runs the request's cycle with another app, as it does for its own 503s.
            app, self.app = self.app, _refusal(431, "headers_too_large", self._too_large())
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_head = True  # what comes next is the next request's head
        self.head_bytes = self.head_sweeps = 0
        super().on_message_complete()

    def sweep(self) -> None:
        """One look of the server's sweep (module docstring)."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # no request in progress
            if self.timeout_keep_alive_task is not None:
                return  # idle after a response: uvicorn's keep-alive timeout closes it
            # A head coming in, a fresh connection, or bytes after a response, which cancelled
            # uvicorn's keep-alive timeout (a body the app did not read, and its end).
            self.head_sweeps += 1
            if self.head_sweeps >= self.limits.header_sweeps:
                self._head_timed_out()
        elif cycle.more_body and not cycle.response_started:  # the app may be waiting on the body
            self.body_sweeps += 1
            if self.body_sweeps >= self.limits.body_sweeps:
                cycle.message_event.set()  # its receive returns what came; the middleware looks at the time

    def _head_timed_out(self) -> None:
        if self.in_head and self.head_bytes:
            timeout = self.limits.header_timeout
            message = f"the request's headers did not arrive within {timeout:g} s (CHATSSE_HEADER_TIMEOUT)"
            self._refuse(408, "request_timeout", message)
        else:  # a connection that never sent a byte, or a body the app did not read
            self.transport.close()

    def _too_large(self) -> str:
        limits = self.limits
        return (
            f"request headers over {limits.max_header_bytes} bytes or {limits.max_headers} fields "
            "(CHATSSE_MAX_HEADER_SIZE, CHATSSE_MAX_HEADERS)"
        )

    def _refuse(self, status: int, error_type: str, message: str) -> None:
        """Answer a request whose head never completed, and close the connection."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # else a response is being written: just close
            path = getattr(self, "url", b"").decode("latin-1")  # what has come of it
            body = error_body_for(path, status, error_type, message)
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-type: application/json\r\nconnection: close\r\n")
            head.append(b"content-length: %d\r\n\r\n" % len(body))
            self.transport.write(b"".join(head) + body)
        log.info("request_refused", status=status, error=error_type, client=self.client)
        self.transport.close()


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A head's size as sent, but for its method and version: the target and each field line."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def _refusal(status: int, error_type: str, message: str) -> Any:
    """An ASGI app that answers every request with this error, in its front's shape, and
    closes the connection."""

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body_for(scope["path"], status, error_type, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        log.info("request_refused", status=status, error=error_type, client=scope.get("client"))

    return refuse


def sweep(connections: Iterable[object]) -> None:
    """One sweep of a server's connections (uvicorn's ``server_state.connections``)."""
    for connection in tuple(connections):
        if isinstance(connection, LimitedHttpProtocol):
            connection.sweep()
