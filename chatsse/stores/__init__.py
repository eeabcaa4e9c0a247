"""Where conversations live: the store interface (``base``), its three implementations
(``memory``, ``sqlite``, ``redis``), the ``CHATSSE_STORE`` grammar (``urls``) and
:func:`open_store`.

The backends are imported when opened, so that reading settings never imports a Redis client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatsse.stores.base import ConversationStore, StoreLimits
from chatsse.stores.urls import StoreURL, parse_store_url

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ConversationStore", "StoreLimits", "StoreURL", "open_store", "parse_store_url"]


def open_store(
    url: str | StoreURL, limits: StoreLimits, *, timeout: float, clock: Callable[[], float] | None = None
) -> ConversationStore:
    """The store ``url`` names. ``timeout`` bounds each wait on SQLite's write lock and each
    Redis connect and reply; ``clock`` (default ``time.time``) runs the TTL and locks."""
    import time

    try:
        store_url = parse_store_url(url) if isinstance(url, str) else url
    except ValueError as exc:
        raise ValueError(f"CHATSSE_STORE: {exc}") from None
    clock = clock or time.time
    if store_url.kind == "memory":
        from chatsse.stores.memory import MemoryStore

        return MemoryStore(limits, clock=clock)
    if store_url.kind == "sqlite":
        from chatsse.stores.sqlite import SQLiteStore

        return SQLiteStore(store_url.path, limits, timeout=timeout, clock=clock)
    from chatsse.stores.redis import RedisStore

    return RedisStore(store_url.url, limits, timeout=timeout, clock=clock)
