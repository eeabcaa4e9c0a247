"""The application factory: ``create_app(settings)`` builds one independent server.

Nothing here is module-level state, so tests and notebooks can run several servers in
one process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from chatsse import __version__
from chatsse.chat import ChatStream
from chatsse.conversations import (
    ConversationBusy,
    ConversationError,
    ConversationFull,
    ConversationLimitReached,
    ConversationManager,
    ConversationNotFound,
    ConversationStore,
)
from chatsse.engine import Engine, SimulatedEngine
from chatsse.logs import configure_logging, get_logger
from chatsse.metrics import Metrics
from chatsse.middleware import SCOPE_ARRIVED, SCOPE_LOG_FIELDS, RequestContextMiddleware, error_body
from chatsse.models import (
    ChatRequest,
    ConversationInfo,
    ConversationList,
    ConversationOut,
    ErrorBody,
    MessageOut,
)
from chatsse.settings import Settings, load_settings
from chatsse.sse import BODY_SEND_SCOPE_KEY, EventStreamResponse, StreamRegistry
from chatsse.stores import open_store

log = get_logger("chatsse.app")
ERROR_STATUS: dict[type[ConversationError], int] = {
    ConversationNotFound: 404,
    ConversationBusy: 409,
    ConversationFull: 409,
    ConversationLimitReached: 503,
}
# JSON escaping can grow a message up to six-fold (\uXXXX); allow that plus the envelope.
_BODY_OVERHEAD = 4096


class ChatsseApp(FastAPI):
    """FastAPI, with the server's own ``send`` left in the scope for event-stream bodies
    (chatsse/sse.py, point 5): outside every middleware, Starlette's error middleware too."""

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope[BODY_SEND_SCOPE_KEY] = send
            await stack(scope, receive, send)

        return app


class ApiError(Exception):
    """An error answered as ``{"error": {"type", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    manager: ConversationManager
    metrics: Metrics
    streams: StreamRegistry
    started_at: float = field(default_factory=time.time)
    open_streams: int = 0
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the server's, set at start-up

    def drain(self) -> None:
        """Begin a graceful shutdown: refuse new chats, give open streams the grace period.
        Safe to call from any thread."""
        loop = self.loop
        if loop is None or self.draining:
            return
        if _running_loop() is loop:
            self._drain()
        else:
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.streams.drain(self.settings.shutdown_grace_period)

    def reserve_stream(self) -> None:
        self.open_streams += 1
        self.metrics.open_streams.inc()

    def release_stream(self) -> None:
        self.open_streams -= 1
        self.metrics.open_streams.dec()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _watch_uvicorn_exit(state: ServerState) -> None:
    """Drain when the uvicorn server running this app starts to exit (SIGTERM, SIGINT).

    uvicorn does not tell the app it is shutting down until every connection has closed,
    which a stream never does by itself. Its signal handler is a bound method of the server,
    so the server (and its ``should_exit``) can be found from the handler, per process and
    per server (unlike sse-starlette's process-global flag)."""
    while True:
        handler = signal.getsignal(signal.SIGTERM)
        server = getattr(handler, "__self__", None)
        if getattr(server, "should_exit", False):
            state.drain()
            return
        await anyio.sleep(0.2)


def _conversation_out(info: ConversationInfo, messages: list[MessageOut] | None = None) -> ConversationOut:
    return ConversationOut(**info.to_dict(), messages=messages)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    store: ConversationStore | None = None,
) -> FastAPI:
    """Build a chatsse server. Defaults: settings from the environment, the simulated
    engine, an in-memory conversation store."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    engine = engine or SimulatedEngine.from_settings(settings)
    if store is None:
        store = open_store(
            settings.store,
            ttl=settings.conversation_ttl,
            max_conversations=settings.max_conversations,
            max_messages=settings.max_conversation_messages,
            lock_ttl=settings.lock_ttl,
        )
    metrics = Metrics()
    state = ServerState(
        settings=settings,
        engine=engine,
        manager=ConversationManager(store, max_history=settings.max_history_length),
        metrics=metrics,
        streams=StreamRegistry(settings.sse_keepalive_interval),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_watch_uvicorn_exit, state)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                await state.streams.aclose()
                await engine.aclose()
                await store.close()

    app = ChatsseApp(title="chatsse", version=__version__, debug=settings.debug, lifespan=lifespan)
    app.state.chatsse = state
    app.state.drain = state.drain  # the hook InProcessServer.stop() calls
    _add_error_handlers(app)
    _add_routes(app, state)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Last-Event-ID", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=6 * settings.max_message_size + _BODY_OVERHEAD,
    )
    return app


def _json_error(
    status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> Response:
    return Response(error_body(error_type, message, **extra), status, headers, media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _json_error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(ConversationError)
    async def conversation_error(request: Request, exc: ConversationError) -> Response:
        return _json_error(ERROR_STATUS.get(type(exc), 400), exc.type, str(exc))

    @app.exception_handler(sqlite3.Error)
    @app.exception_handler(RedisError)
    async def storage_error(request: Request, exc: Exception) -> Response:
        log.error("storage_error", error=f"{type(exc).__name__}: {exc}")
        message = "the conversation store is unavailable"
        return _json_error(503, "storage_unavailable", message, {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
        return _json_error(422, "invalid_request", summary or "invalid request", details=details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        error_type = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code, "http_error"
        )
        return _json_error(exc.status_code, error_type, str(exc.detail), exc.headers)


def _add_routes(app: FastAPI, state: ServerState) -> None:
    """The routes, closed over the app's state (no per-request dependency to resolve)."""
    page = files("chatsse").joinpath("static/index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post(
        "/chat",
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "The reply as an SSE stream."},
            404: {"model": ErrorBody, "description": "Unknown conversation."},
            409: {"model": ErrorBody, "description": "Conversation busy (a turn in progress) or full."},
            413: {"model": ErrorBody, "description": "Message over CHATSSE_MAX_MESSAGE_SIZE."},
            422: {"model": ErrorBody, "description": "Invalid JSON or fields."},
            503: {"model": ErrorBody, "description": "Too many open streams, draining, or store down."},
        },
    )
    async def chat(body: ChatRequest, request: Request) -> Response:
        s = state.settings
        size = len(body.message.encode())
        if size > s.max_message_size:
            state.metrics.rejections.labels("message_too_large").inc()
            raise ApiError(
                413, "message_too_large", f"message is {size} bytes; the limit is {s.max_message_size}"
            )
        if state.draining:
            state.metrics.rejections.labels("shutting_down").inc()
            raise ApiError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "1"})
        if state.open_streams >= s.max_concurrent_connections:
            state.metrics.rejections.labels("server_busy").inc()
            limit = s.max_concurrent_connections
            raise ApiError(
                503, "server_busy", f"{state.open_streams} streams open; the limit is {limit}",
                headers={"Retry-After": str(max(1, round(s.sse_retry_ms / 1000)))},
            )  # fmt: skip
        state.reserve_stream()
        try:
            # Shielded: a lock taken in a shared store must not be left behind by a cancellation.
            with anyio.CancelScope(shield=True):
                turn = await state.manager.begin_turn(body.conversation_id, body.message)
        except BaseException as exc:
            state.release_stream()
            if isinstance(exc, ConversationError):
                state.metrics.rejections.labels(exc.type).inc()
            raise
        stream = ChatStream(
            turn=turn,
            engine=state.engine,
            manager=state.manager,
            metrics=state.metrics,
            max_tokens=min(body.max_tokens or s.max_reply_tokens, s.max_reply_tokens),
            timeout=s.request_timeout,
            retry_ms=s.sse_retry_ms,
            arrived=request.scope.get(SCOPE_ARRIVED, time.perf_counter()),
            log_fields=request.scope.get(SCOPE_LOG_FIELDS, {}),
            release=state.release_stream,
        )
        return EventStreamResponse(stream, state.streams, on_close=stream.close, on_shutdown=stream.shutdown)

    async def chat_fast_path(request: Request) -> Response:
        """``POST /chat`` without FastAPI's per-request machinery (dependency solving, body
        field handling, the exit stack): about 30 us less per turn, measured by
        ``make bench``. Same validation (pydantic, errors answered by ``invalid_request``)
        and the same handler; the route declared above documents it in the OpenAPI schema."""
        request.scope["route"] = fast_route  # as FastAPI's routes do: metrics label requests by it
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
            ) from None
        return await chat(body, request)

    # Matched before the FastAPI route for the same path and method.
    fast_route = Route("/chat", chat_fast_path, methods=["POST"])
    app.router.routes.insert(0, fast_route)

    @app.post("/conversations", status_code=201)
    async def create_conversation() -> ConversationOut:
        return _conversation_out(await state.manager.create(), [])

    @app.get("/conversations")
    async def list_conversations(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ConversationList:
        infos = await state.manager.list(limit)
        return ConversationList(
            conversations=[_conversation_out(i) for i in infos], total=await state.manager.count()
        )

    @app.get("/conversations/{conversation_id}")
    async def get_conversation(
        conversation_id: str, limit: Annotated[int | None, Query(ge=1)] = None
    ) -> ConversationOut:
        info = await state.manager.get(conversation_id)
        if info is None:
            raise ConversationNotFound(f"no conversation {conversation_id}")
        messages = await state.manager.messages(conversation_id, limit)
        return _conversation_out(info, [MessageOut(**m.to_dict()) for m in messages])

    @app.delete("/conversations/{conversation_id}", status_code=204)
    async def delete_conversation(conversation_id: str) -> Response:
        if not await state.manager.delete(conversation_id):
            raise ConversationNotFound(f"no conversation {conversation_id}")
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "pid": os.getpid(),
            "engine": state.engine.name,
            "store": state.manager.store.name,
            "open_streams": state.open_streams,
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        state.metrics.conversations.set(await state.manager.count())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        state.metrics.conversations.set(await state.manager.count())
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "engine": state.engine.name,
            "store": state.manager.store.name,
            **state.metrics.summary(),
            # Of the process that answered (like "pid"): see chatsse.serving.tune_garbage_collector.
            "gc": {
                "thresholds": list(gc.get_threshold()),
                "frozen_objects": gc.get_freeze_count(),
                "collections": [generation["collections"] for generation in gc.get_stats()],
            },
        }
