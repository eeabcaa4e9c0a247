"""POST routes served as plain ASGI apps: :class:`DirectEndpoint`.

``ChatsseApp`` (chatsse/app.py) calls a direct endpoint inside the app's own middleware
(request context, CORS) but ahead of FastAPI's routing, exception and exit-stack layers: the
request body is read, validated with pydantic and answered here, errors included. ``make
bench`` measures what that saves per turn. Each front declares the same route on the FastAPI
app too (calling the same :meth:`DirectEndpoint.handle`), which documents it in the OpenAPI
schema.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from chatsse.errors import ApiError
from chatsse.logs import get_logger
from chatsse.middleware import BodyRefused
from chatsse.state import AppState

__all__ = ["DirectEndpoint"]

log = get_logger("chatsse.endpoints")


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class DirectEndpoint(ABC):
    """One ``POST`` route as a plain ASGI app that answers its own errors, in its front's
    error shape (:meth:`error`)."""

    path: str

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.route = Route(self.path, self, methods=["POST"])  # the route metrics label requests by

    @abstractmethod
    async def handle(self, body: bytes, scope: Scope) -> Response:
        """Parse and answer one request (raise ``ValidationError`` or ``ApiError`` to refuse it)."""

    @abstractmethod
    def error(self, status: int, error_type: str, message: str, **extra: Any) -> Response:
        """An error answer in this front's shape."""

    @abstractmethod
    def invalid(self, exc: ValidationError) -> Response:
        """The answer to a body that does not validate."""

    def api_error(self, exc: ApiError) -> Response:
        response = self.error(exc.status, exc.type, exc.message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        response: Response
        try:
            response = await self.handle(await _read_body(receive), scope)
        except _Disconnected:
            return
        except ValidationError as exc:
            response = self.invalid(exc)
        except ApiError as exc:
            response = self.api_error(exc)
        except BodyRefused as exc:  # over the size limit, or late (RequestContextMiddleware)
            response = self.error(exc.status_code, exc.type, str(exc.detail))
            if exc.headers:
                response.headers.update(exc.headers)
        except Exception as exc:
            log.error("request_failed", path=self.path, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            response = self.error(500, "internal_error", "the server failed to start the turn")
        await response(scope, receive, send)
