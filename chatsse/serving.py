"""Running the app: the uvicorn server every server command uses, the gunicorn worker, and the
gunicorn settings derived from chatsse's (chatsse/gunicorn_conf.py).

This module must not import prometheus-client (nor the app): gunicorn's master imports it
before it sets up the multiprocess metrics directory that workers inherit.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import uvicorn
from uvicorn_worker import UvicornWorker

from chatsse.connection import LimitedHttpProtocol, connection_limits_of, sweep
from chatsse.deadlines import derive
from chatsse.lifecycle import Lifecycle, lifecycle_of
from chatsse.logs import configure_logging, get_logger, gunicorn_log_config
from chatsse.settings import Settings, SettingsError, env_name, is_loopback
from chatsse.stores.urls import DEFAULT_SHARED_STORE

__all__ = [
    "GC_THRESHOLDS",
    "ChatsseServer",
    "ChatsseWorker",
    "GunicornPlan",
    "choose_store",
    "create_served_app",
    "plan",
    "serve",
    "tune_garbage_collector",
]


_UVICORN_TICK = 0.1  # seconds between two calls of uvicorn.Server.on_tick


class ChatsseServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first drains the app's streams (its lifecycle) and
    then waits for them no longer than the app's deadlines allow (chatsse/deadlines.py).

    uvicorn alone tells an app nothing of a shutdown until every connection has closed,
    which a stream never does by itself; it would wait for every reply to end, or, with a
    graceful timeout, cut the streams with no last event.

    For a chatsse app it also serves each connection with the app's connection limits
    (chatsse/connection.py: the time and size of a request's headers, the time of its body),
    sweeping its connections from uvicorn's own tick. An explicit ``http="h11"`` keeps h11,
    with no time bounds; its ``h11_max_incomplete_event_size`` is set to the header size limit,
    which bounds a head still incomplete (measured: a whole 5000-byte head passed a 4096 one)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle | None = None) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        if lifecycle is not None:
            config.timeout_graceful_shutdown = lifecycle.deadlines.server_shutdown  # type: ignore[assignment]
        self._sweep_every = 0  # uvicorn ticks between two sweeps of the connections; 0: none
        limits = connection_limits_of(config.app)
        if limits is not None:
            if config.http in ("auto", "httptools"):
                config.http = partial(LimitedHttpProtocol, limits=limits)  # type: ignore[assignment]
                self._sweep_every = max(1, round(limits.sweep / _UVICORN_TICK))
            if config.h11_max_incomplete_event_size is None:
                config.h11_max_incomplete_event_size = limits.max_header_bytes

    async def on_tick(self, counter: int) -> bool:
        if self._sweep_every and counter % self._sweep_every == 0:
            sweep(self.server_state.connections)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.lifecycle is not None:
            self.lifecycle.drain()
        await super().shutdown(sockets=sockets)


class ChatsseWorker(UvicornWorker):  # type: ignore[misc]
    """gunicorn's uvicorn worker (the ``uvicorn-worker`` package), serving with
    :class:`ChatsseServer`: on SIGTERM the worker drains its streams, each ends with its last
    event, and the worker exits before gunicorn's graceful timeout (derived from the same
    settings) would kill it."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": "auto", "server_header": False}

    async def _serve(self) -> None:
        from gunicorn.arbiter import Arbiter

        self.config.app = self.wsgi
        server = ChatsseServer(self.config, lifecycle_of(self.wsgi))
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


# Measured with ``scripts/bench_server.py``'s paced streams (10 tokens/s each, one worker on
# one core): with Python's defaults (700, 10, 10), ITL p99 passed 300 ms at 1600 streams
# while the core was half idle; with these, 1600 streams held 133 ms and 2400 held 160 ms.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector's event-loop stalls rare, for a server process.

    A full collection scans every tracked object, and each open stream holds a hundred or so
    (coroutines, tasks, futures), so with thousands of streams a full collection stalls every
    stream for tens of milliseconds, and with the default thresholds one comes every few
    hundred thousand allocations. Two changes:

    - everything allocated so far (modules, the app) is frozen out of the collector's sight;
    - collections are triggered after more allocations (``GC_THRESHOLDS``): a full one
      after about eight million instead of seventy thousand.

    Memory stays bounded: a chat turn leaves no cyclic garbage behind (reference counting
    frees it), and whatever cycles other paths leave are still collected, later.
    Applied by the server commands (gunicorn workers, ``chatsse serve``), not by
    ``create_app``: a notebook's kernel keeps its own settings.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_served_app() -> Any:
    """``create_app()`` with the process tuned as chatsse's server commands tune it, for
    ``uvicorn --factory chatsse.serving:create_served_app``."""
    from chatsse.app import create_app  # here: this module must not import the app at import

    app = create_app()
    tune_garbage_collector()
    return app


def access_notice(settings: Settings) -> str:
    """What the server says at start-up about who may use it."""
    where = f"{settings.host}:{settings.port}"
    if settings.keys_file:
        return f"API keys required on {where} (CHATSSE_KEYS_FILE={settings.keys_file})"
    reach = "from this machine only" if is_loopback(settings.host) else "from anywhere it is reachable"
    return (
        f"no API keys (CHATSSE_KEYS_FILE is not set): {where} is open to anyone, {reach}; "
        "every caller shares one set of conversations"
    )


def announce_access(settings: Settings) -> None:
    """Log :func:`access_notice` once, at start-up, in the server's log format."""
    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("chatsse.serving")
    (log.info if settings.keys_file else log.warning)(access_notice(settings))


def serve(settings: Settings) -> None:
    """``chatsse serve``: one uvicorn process serving the app these settings describe."""
    from chatsse.app import create_app

    announce_access(settings)
    app = create_app(settings)
    tune_garbage_collector()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_keep_alive=settings.keepalive,
        server_header=False,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        ChatsseServer(config, app.lifecycle).run()


@dataclass(frozen=True)
class GunicornPlan:
    """What chatsse/gunicorn_conf.py sets, derived from chatsse's settings."""

    bind: str
    workers: int
    store: str
    timeout: int
    graceful_timeout: int
    keepalive: int
    loglevel: str
    logconfig_dict: dict[str, Any]


def choose_store(settings: Settings) -> str:
    """The store for ``settings.workers`` workers: the one chosen, else SQLite with several
    workers; never one that a single process holds (each worker would hold its own,
    disjoint conversations)."""
    if settings.workers > 1 and not settings.store_is_chosen:
        return DEFAULT_SHARED_STORE
    if settings.workers > 1 and not settings.store_url.shared:
        store, workers = env_name("store"), env_name("workers")
        raise SettingsError(
            f"{store}={settings.store} keeps conversations inside one worker process, but "
            f"{workers}={settings.workers}: the next turn of a conversation may reach a worker "
            f"that has never seen it. Use {store}=sqlite:///path/to/chatsse.db (one machine), "
            f"{store}=redis://host:6379/0 (several machines), or {workers}=1."
        )
    return settings.store


def plan(settings: Settings) -> GunicornPlan:
    deadlines = derive(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return GunicornPlan(
        bind=f"{host}:{settings.port}",
        workers=settings.workers,
        store=choose_store(settings),
        timeout=deadlines.gunicorn_timeout,
        graceful_timeout=deadlines.gunicorn_graceful,
        keepalive=settings.keepalive,
        loglevel=settings.log_level,
        logconfig_dict=gunicorn_log_config(settings.log_level, settings.log_format),
    )
