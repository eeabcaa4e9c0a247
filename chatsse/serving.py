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


def freeze_startup_objects() -> None:
    """Move everything allocated so far (modules, the app) out of the garbage collector's
    sight. A full collection scans every tracked object and stalls the event loop meanwhile;
    with thousands of open streams such a stall shows up as inter-token latency."""
    gc.collect()
    gc.freeze()


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
