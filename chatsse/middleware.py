"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would sit between every event and
the socket). One middleware does the per-request bookkeeping: request id, body size and
time limits, metrics and the single log line at the end of each request or stream."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsse.ids import new_id
from chatsse.metrics import Metrics
from chatsse.protocol import error_body_for

__all__ = [
    "REQUEST_ID_HEADER",
    "SCOPE_ARRIVED",
    "SCOPE_LOG_FIELDS",
    "BodyRefused",
    "BodyTimeout",
    "BodyTooLarge",
    "RequestContextMiddleware",
    "send_error",
]

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SCOPE_ARRIVED = "chatsse.arrived"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SCOPE_LOG_FIELDS = "chatsse.log_fields"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.log = structlog.stdlib.get_logger("chatsse.access")
        self._logger = logging.getLogger("chatsse.access")
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        request_id = _request_id(scope)
        fields: dict[str, Any] = {}
        scope[SCOPE_ARRIVED] = arrived
        scope[SCOPE_LOG_FIELDS] = fields
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            too_large = _declared_length(scope) > self.max_body_bytes
            if too_large:
                message = f"request body over {self.max_body_bytes} bytes"
                await send_error(send_with_id, 413, "request_too_large", message, scope["path"])
            else:
                receive = _limited(receive, self.max_body_bytes, arrived, self.body_timeout)
                await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, arrived, fields)
            structlog.contextvars.reset_contextvars(**tokens)

    def _record(self, scope: Scope, status: int, arrived: float, fields: dict[str, Any]) -> None:
        duration = time.perf_counter() - arrived
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"  # bounded label values
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # label lookups take a lock and build tuples; do them once per key
            children = self._children[key] = (
                self.metrics.requests.labels(method, route, str(status)),
                self.metrics.request_duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(duration)
        if self._logger.isEnabledFor(logging.INFO):  # a filtered line costs one check, not a call
            self.log.info(
                "request", method=method, path=scope["path"], status=status,
                duration_ms=round(duration * 1000, 3), **fields,
            )  # fmt: skip


class BodyRefused(HTTPException):
    """Raised while a request body is read: it is over the size limit, or late.

    An ``HTTPException``, so FastAPI's body parsing lets it through; the direct endpoints and
    the app's handler answer it in the front's error shape, with ``type``."""

    type: ClassVar[str]


class BodyTooLarge(BodyRefused):
    """A body over the limit that did not declare its length (one that did is refused unread)."""

    type = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class BodyTimeout(BodyRefused):
    """A body still incomplete ``CHATSSE_BODY_TIMEOUT`` seconds after its request arrived; the
    answer closes the connection."""

    type = "request_timeout"

    def __init__(self, timeout: float) -> None:
        message = f"the request body did not arrive within {timeout:g} s (CHATSSE_BODY_TIMEOUT)"
        super().__init__(408, message, headers={"connection": "close"})


def _limited(receive: Receive, limit: int, arrived: float, timeout: float) -> Receive:
    """``receive``, refusing a body over ``limit`` bytes, or one still incomplete ``timeout``
    seconds after ``arrived``. The time is looked at when a part of a body arrives without its
    end, which costs a complete body nothing; a client that sends nothing more is woken by the
    server's connection sweep (chatsse/connection.py), which makes this ``receive`` return."""
    seen = 0
    deadline = arrived + timeout

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            if message.get("more_body", False) and time.perf_counter() > deadline:
                raise BodyTimeout(timeout)
        return message

    return limited_receive


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(text):
                return text
            break
    return new_id("req_")


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def send_error(
    send: Send,
    status: int,
    error_type: str,
    message: str,
    path: str,
    headers: Sequence[tuple[bytes, str]] = (),
) -> None:
    """Answer with a JSON error in the shape of the front ``path`` belongs to."""
    body = error_body_for(path, status, error_type, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((name, value.encode("latin-1")) for name, value in headers),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
