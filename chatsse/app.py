"""The application factory: ``create_app(settings)`` builds one independent server.

Nothing here is module-level state, so tests and notebooks can run several servers in
one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from chatsse import __version__
from chatsse.auth import AuthMiddleware
from chatsse.chat import add_chat_route
from chatsse.connection import ConnectionLimits
from chatsse.conversations import ConversationManager
from chatsse.deadlines import Deadlines, derive
from chatsse.engine import Engine, SimulatedEngine
from chatsse.errors import ApiError
from chatsse.keys import KeyRing
from chatsse.lifecycle import Lifecycle
from chatsse.limits import TurnLimits, open_limiter
from chatsse.logs import configure_logging, get_logger
from chatsse.metrics import Metrics
from chatsse.middleware import BodyRefused, RequestContextMiddleware
from chatsse.openai import add_openai_routes
from chatsse.openai.wire import invalid_parameters, openai_error
from chatsse.openapi import document_errors
from chatsse.protocol import error_body_for
from chatsse.replay import ReplayLimits, open_replay_log
from chatsse.replay.recorder import ReplayRecorder
from chatsse.replay.signals import open_signals
from chatsse.responses import api_error, invalid_request, json_error
from chatsse.resume import add_resume_routes
from chatsse.routes import add_routes
from chatsse.settings import Settings, load_settings
from chatsse.sse import BODY_SEND_SCOPE_KEY
from chatsse.state import AppState
from chatsse.stores import ConversationStore, StoreLimits, open_store

__all__ = ["ChatsseApp", "create_app"]

log = get_logger("chatsse.app")
# JSON escaping can grow a message up to six-fold (\uXXXX); allow that plus the envelope.
_BODY_OVERHEAD = 4096
_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_FOLLOW_POLL = 0.05  # seconds between two looks of a resuming reader at a shared log's live tail
_WORKER_SAMPLE_INTERVAL = 1.0  # seconds between two samples of this process's asyncio tasks


class ChatsseApp(FastAPI):
    """FastAPI, with three additions:

    - ``lifecycle``: the app's :class:`~chatsse.lifecycle.Lifecycle`, which the server commands
      drain on shutdown; ``connection_limits``, what the server commands let a client send
      before the app answers (chatsse/connection.py);
    - the server's own ``send`` left in the scope for event-stream bodies (chatsse/sse.py,
      point 4): outside every middleware, Starlette's error middleware too;
    - direct routes (:meth:`add_direct_route`): plain ASGI endpoints that run inside the app's
      own middleware but skip FastAPI's routing and exception layers (``POST /chat``).
    """

    lifecycle: Lifecycle
    connection_limits: ConnectionLimits

    def add_direct_route(self, method: str, path: str, endpoint: ASGIApp) -> None:
        """Serve ``method path`` (exactly) with ``endpoint``, which answers its own errors."""
        self._direct_routes = {**getattr(self, "_direct_routes", {}), (method, path): endpoint}

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        direct: dict[tuple[str, str], ASGIApp] = {}
        for key, endpoint in getattr(self, "_direct_routes", {}).items():
            for cls, args, kwargs in reversed(self.user_middleware):
                endpoint = cls(endpoint, *args, **kwargs)
            direct[key] = endpoint

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope[BODY_SEND_SCOPE_KEY] = send
            if scope["type"] == "http":
                endpoint = direct.get((scope["method"], scope["path"]))
                if endpoint is not None:
                    scope["app"] = self
                    await endpoint(scope, receive, send)
                    return
            await stack(scope, receive, send)

        return app


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    store: ConversationStore | None = None,
) -> ChatsseApp:
    """Build a chatsse server. Defaults: settings from the environment, the simulated
    engine, the store ``CHATSSE_STORE`` names."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    deadlines = derive(settings)
    engine = engine or _engine(settings, deadlines)
    if store is None:
        limits = StoreLimits(
            ttl=settings.conversation_ttl,
            max_conversations=settings.max_conversations,
            max_messages=settings.max_conversation_messages,
            lock_ttl=deadlines.lock_ttl,
        )
        store = open_store(settings.store_url, limits, timeout=deadlines.store)
    metrics = Metrics()
    manager = ConversationManager(store, max_history=settings.max_history_length, timeout=deadlines.store)
    lifecycle = Lifecycle(deadlines, max_streams=settings.max_streams_per_worker, gauge=metrics.open_streams)
    replay_limits = ReplayLimits(
        ttl=settings.replay_ttl,
        max_items=settings.max_reply_tokens + 2,  # the opening, the tokens, the last event
        max_logs=settings.max_conversations,
        poll_interval=min(settings.replay_flush_interval, _FOLLOW_POLL),
    )
    replay = open_replay_log(store, replay_limits)
    recorder = ReplayRecorder(replay, interval=settings.replay_flush_interval)
    signals = open_signals(store)
    turn_limits = TurnLimits(settings, open_limiter(store, lease_ttl=settings.limit_lease_ttl))
    state = AppState(
        settings, deadlines, engine, manager, metrics, lifecycle, replay, recorder, signals, turn_limits
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sampler = asyncio.get_running_loop().create_task(metrics.sample_worker(_WORKER_SAMPLE_INTERVAL))
        try:
            yield
        finally:
            sampler.cancel()
            await lifecycle.aclose()  # bounded by the drain's own deadlines
            await recorder.aclose(within=deadlines.store)  # the streams' last items, before the store closes
            await signals.close()
            await turn_limits.aclose()
            for step, bound in ((engine.aclose, deadlines.token_gap), (manager.aclose, 2 * deadlines.store)):
                try:
                    async with asyncio.timeout(bound):
                        await step()
                except Exception as exc:  # the app stops either way; say what did not close
                    log.warning("close_failed", step=step.__qualname__, error=f"{type(exc).__name__}: {exc}")

    app = ChatsseApp(title="chatsse", version=__version__, debug=settings.debug, lifespan=lifespan)
    app.lifecycle = lifecycle
    _add_error_handlers(app)
    add_chat_route(app, state)
    add_openai_routes(app, state)
    add_resume_routes(app, state)
    add_routes(app, state)
    document_errors(app, keyed=bool(settings.keys_file))
    if settings.keys_file:  # innermost: CORS answers a preflight, and a 401 is counted and logged
        app.add_middleware(
            AuthMiddleware,
            keys=KeyRing(settings.keys_file),
            serves=partial(_serves, app),
            operator_routes_open=settings.operator_routes_open,
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=6 * settings.max_message_size + _BODY_OVERHEAD,
        body_timeout=deadlines.body,
    )
    app.connection_limits = ConnectionLimits.from_settings(settings, deadlines)
    return app


def _engine(settings: Settings, deadlines: Deadlines) -> Engine:
    """The engine ``CHATSSE_ENGINE`` names."""
    if settings.engine == "openai":
        from chatsse.upstream import UpstreamEngine

        return UpstreamEngine(
            base_url=settings.upstream_url,
            model=settings.upstream_model,
            api_key=settings.upstream_api_key.get_secret_value(),
            max_connections=settings.upstream_max_connections,
            connect_timeout=settings.upstream_connect_timeout,
            start_timeout=deadlines.first_token,
            retries=settings.upstream_retries,
        )
    return SimulatedEngine.from_settings(settings)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return api_error(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith("/v1/"):  # OpenAI's answer to bad parameters: 400
            return invalid_parameters(exc.errors())
        return invalid_request(exc.errors())

    @app.exception_handler(BodyRefused)
    async def on_body_refused(request: Request, exc: BodyRefused) -> Response:
        body = error_body_for(request.scope["path"], exc.status_code, exc.type, str(exc.detail))
        return Response(body, exc.status_code, exc.headers, media_type="application/json")

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the methods of one route; the path has more
            headers = {**(headers or {}), "Allow": ", ".join(_methods_of(app, request.scope))}
        if request.url.path.startswith("/v1/"):
            return openai_error(exc.status_code, error_type, str(exc.detail), headers=headers)
        return json_error(exc.status_code, error_type, str(exc.detail), headers)


def _methods_of(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path."""
    return sorted(_methods_at(app, scope["path"]))


def _methods_at(app: FastAPI, path: str) -> set[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    return methods


def _serves(app: FastAPI, method: str, path: str) -> bool:
    """Whether a route's handler answers ``method path`` (direct routes are declared too)."""
    return method in _methods_at(app, path)
