"""Serving under gunicorn: the worker class and the settings ``gunicorn.conf.py`` derives.

This module must not import prometheus-client (nor the app): gunicorn's master imports it
before it sets up the multiprocess metrics directory that workers inherit.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

from chatsse.logs import gunicorn_log_config
from chatsse.settings import Settings

DEFAULT_SQLITE_STORE = "sqlite:///.chatsse/conversations.db"


class StoreError(ValueError):
    """The configured store cannot serve the configured number of workers."""


class ChatsseWorker(UvicornWorker):  # type: ignore[misc]
    """gunicorn's uvicorn worker, with uvicorn's graceful shutdown bounded by gunicorn's.

    ``UvicornWorker`` leaves uvicorn's ``timeout_graceful_shutdown`` unset, so uvicorn waits
    for open streams without limit and gunicorn's SIGKILL ends them silently. Here uvicorn
    gives up a second before gunicorn would, after chatsse's streams have had their grace
    period and sent their shutdown event.
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": "auto", "server_header": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(1, int(self.cfg.graceful_timeout) - 1)


# Measured with ``scripts/bench_server.py``'s paced streams (10 tokens/s each, one worker on
# one core): with Python's defaults (700, 10, 10), ITL p99 passed 300 ms at 1600 streams
# while the core was half idle; with these, 1600 streams held 133 ms and 2400 held 160 ms.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector's event-loop stalls rare, for a server process.

    A full collection scans every tracked object, and each open stream holds a hundred and
    fifty or so (coroutines, tasks, scopes), so with thousands of streams a full collection
    stalls every stream for tens of milliseconds, and with the default thresholds one
    comes every few hundred thousand allocations. Two changes:

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
    ``uvicorn --factory chatsse.serving:create_served_app`` (``make bench`` runs it so)."""
    from chatsse.app import create_app  # here: this module must not import the app at import

    app = create_app()
    tune_garbage_collector()
    return app


@dataclass(frozen=True)
class GunicornPlan:
    """What gunicorn.conf.py sets, derived from chatsse's settings."""

    bind: str
    workers: int
    store: str
    timeout: int
    graceful_timeout: int
    keepalive: int
    loglevel: str
    logconfig_dict: dict[str, Any]


def choose_store(settings: Settings, environ: dict[str, str] | os._Environ[str]) -> str:
    """The store for ``settings.workers`` workers: SQLite unless one was chosen; never memory
    with several workers (each worker would hold its own, disjoint conversations)."""
    if "CHATSSE_STORE" not in environ and settings.workers > 1:
        return DEFAULT_SQLITE_STORE
    if settings.store == "memory" and settings.workers > 1:
        raise StoreError(
            f"CHATSSE_STORE=memory keeps conversations inside one worker process, but "
            f"CHATSSE_WORKERS={settings.workers}: the next turn of a conversation may reach a worker "
            f"that has never seen it. Use CHATSSE_STORE=sqlite:///path/to/chatsse.db (one machine), "
            f"CHATSSE_STORE=redis://host:6379/0 (several machines), or CHATSSE_WORKERS=1."
        )
    return settings.store


def plan(settings: Settings, environ: dict[str, str] | os._Environ[str]) -> GunicornPlan:
    grace = int(settings.shutdown_grace_period + 0.999)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return GunicornPlan(
        bind=f"{host}:{settings.port}",
        workers=settings.workers,
        store=choose_store(settings, environ),
        # gunicorn's heartbeat timeout also bounds a worker that is draining on a reload;
        # it must outlast the grace period.
        timeout=max(30, grace + 10),
        graceful_timeout=grace + 5,
        keepalive=settings.keepalive,
        loglevel=settings.log_level,
        logconfig_dict=gunicorn_log_config(settings.log_level, settings.log_format),
    )
