"""Signals to the worker streaming a reply, from any worker: :class:`ReplySignals`.

Two kinds: ``stop`` (``POST .../stop``: end the reply now, stored as ``stopped``) and
``resumed`` (a client is reading the reply's log, so a stream whose own client went away
keeps generating: ``CHATSSE_RESUME_WINDOW``). The worker streaming a reply *watches* its id;
a signal sent for an id nobody watches is dropped.

Where the store is shared, the signal goes through it, so the sender may be another process
or machine:

- Redis: ``PUBLISH`` on one channel; each worker that watches a reply holds one subscription.
- SQLite: a row in ``reply_signals``; each worker that watches a reply reads the new rows
  every ``SIGNAL_POLL`` seconds (one indexed query for all the replies it streams), so a
  signal arrives within that interval plus the query.
- Memory (one process): the watcher is called in the next turn of the event loop.

Delivery is at most once: a sender that needs its signal acted on (a stop) watches for the
effect (the reply's log completing) and sends again if it does not come.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Final, Literal, Protocol

from chatsse.errors import StorageUnavailable
from chatsse.logs import get_logger
from chatsse.stores.base import ConversationStore
from chatsse.stores.sqlite import SQLiteStore, _transaction

__all__ = [
    "RESUMED",
    "SIGNAL_POLL",
    "STOP",
    "MemorySignals",
    "ReplySignals",
    "SQLiteSignals",
    "SignalKind",
    "open_signals",
]

log = get_logger("chatsse.replay")

SignalKind = Literal["stop", "resumed"]
STOP: Final = "stop"
RESUMED: Final = "resumed"
_KINDS: Final = frozenset((STOP, RESUMED))
SIGNAL_POLL: Final = 0.02  # seconds between two looks at SQLite's signals, while watching
_SIGNAL_TTL: Final = 60.0  # seconds a SQLite signal row is kept

OnSignal = Callable[[SignalKind], None]


class ReplySignals(Protocol):
    async def send(self, reply_id: str, kind: SignalKind) -> None:
        """Raises ``StorageUnavailable`` if the store does not take it."""
        ...

    def watch(self, reply_id: str, on_signal: OnSignal) -> None:
        """Call ``on_signal`` (in the event loop) for each signal sent to ``reply_id``."""
        ...

    def unwatch(self, reply_id: str) -> None: ...

    async def close(self) -> None: ...


class _Watching:
    """The watchers of one worker, and the task that listens while there are any."""

    def __init__(self) -> None:
        self._watchers: dict[str, OnSignal] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, reply_id: str, on_signal: OnSignal) -> None:
        self._watchers[reply_id] = on_signal
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen_while_watched())

    def unwatch(self, reply_id: str) -> None:
        self._watchers.pop(reply_id, None)

    def _deliver(self, reply_id: str, kind: str) -> None:
        on_signal = self._watchers.get(reply_id)
        if on_signal is not None and kind in _KINDS:
            on_signal(kind)  # type: ignore[arg-type]  # checked against _KINDS

    async def _listen_while_watched(self) -> None:
        try:
            await self._listen()
        except Exception as exc:
            log.error("signal_listener_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        finally:
            self._task = None

    async def _listen(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self._watchers.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class MemorySignals(_Watching):
    """One process: a signal is a call in the next turn of the loop."""

    async def send(self, reply_id: str, kind: SignalKind) -> None:
        asyncio.get_running_loop().call_soon(self._deliver, reply_id, kind)

    def watch(self, reply_id: str, on_signal: OnSignal) -> None:
        self._watchers[reply_id] = on_signal  # nothing to listen to: no task


_SCHEMA = """
CREATE TABLE IF NOT EXISTS reply_signals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reply_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reply_signals_by_time ON reply_signals (sent_at);
"""


class SQLiteSignals(_Watching):
    """Rows of ``reply_signals`` in the conversations' file, read by each watching worker
    every ``poll`` seconds from the last row it saw."""

    def __init__(self, store: SQLiteStore, *, poll: float = SIGNAL_POLL) -> None:
        super().__init__()
        self._store = store
        self.poll = poll

        def create(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)

        store.run_now(create)

    async def send(self, reply_id: str, kind: SignalKind) -> None:
        now = time.time()

        def insert(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                conn.execute("DELETE FROM reply_signals WHERE sent_at < ?", (now - _SIGNAL_TTL,))
                conn.execute(
                    "INSERT INTO reply_signals (reply_id, kind, sent_at) VALUES (?, ?, ?)",
                    (reply_id, kind, now),
                )

        await self._store.run(insert)

    async def _listen(self) -> None:
        def last_id(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(id) FROM reply_signals").fetchone()
            return int(row[0] or 0)

        def since(seen: int) -> Callable[[sqlite3.Connection], list[tuple[int, str, str]]]:
            def read(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
                return conn.execute(
                    "SELECT id, reply_id, kind FROM reply_signals WHERE id > ? ORDER BY id", (seen,)
                ).fetchall()

            return read

        seen: int | None = None
        while self._watchers:
            try:
                if seen is None:
                    seen = await self._store.run(last_id, read=True)
                for row_id, reply_id, kind in await self._store.run(since(seen), read=True):
                    seen = row_id
                    self._deliver(reply_id, kind)
            except (StorageUnavailable, RuntimeError) as exc:  # a busy file, or the store closing
                log.warning("signal_poll_failed", error=str(exc))
            await asyncio.sleep(self.poll)


def open_signals(store: ConversationStore) -> ReplySignals:
    """The signals that reach every worker sharing ``store``."""
    if isinstance(store, SQLiteStore):
        return SQLiteSignals(store)
    if store.name == "redis":  # redis-py is imported only where a Redis store is used
        from chatsse.replay.redis import RedisSignals
        from chatsse.stores.redis import RedisStore

        assert isinstance(store, RedisStore)
        return RedisSignals(store)
    return MemorySignals()
