"""Replay logs in the SQLite file of the conversations (``CHATSSE_STORE=sqlite:///...``), on
the store's own connection and thread: one writer per machine, readers on any worker."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence

from chatsse.replay.base import Replay, ReplayLimits, ReplayMeta, ReplayWrite, _check_append
from chatsse.stores.sqlite import SQLiteStore, _transaction

__all__ = ["SQLiteReplayLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replay_logs (
    reply_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    front TEXT NOT NULL,
    length INTEGER NOT NULL,
    done INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS replay_logs_by_expiry ON replay_logs (expires_at);
CREATE TABLE IF NOT EXISTS replay_items (
    reply_id TEXT NOT NULL REFERENCES replay_logs (reply_id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (reply_id, position)
) WITHOUT ROWID;
"""


def _create(conn: sqlite3.Connection) -> None:
    with _transaction(conn, "IMMEDIATE"):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)


def _write(conn: sqlite3.Connection, write: ReplayWrite, now: float, limits: ReplayLimits) -> None:
    row = conn.execute(
        "SELECT length, done FROM replay_logs WHERE reply_id = ?", (write.reply_id,)
    ).fetchone()
    length, finished = (0, 0) if row is None else row
    if finished:
        return
    items = write.items
    new = _check_append(length, write.start, len(items), limits.max_items)
    meta = write.meta
    conn.execute(
        "INSERT INTO replay_logs VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (reply_id) DO UPDATE"
        " SET length = excluded.length, done = excluded.done, expires_at = excluded.expires_at",
        (write.reply_id, meta.conversation_id, meta.front, length + new, int(write.done), now + limits.ttl),
    )
    conn.executemany(
        "INSERT INTO replay_items VALUES (?, ?, ?)",
        [(write.reply_id, length + i, item) for i, item in enumerate(items[len(items) - new :])],
    )


class SQLiteReplayLog:
    """Each append is one ``BEGIN IMMEDIATE`` transaction that also deletes expired logs;
    a waiting reader looks again every ``poll_interval`` (other processes write the file)."""

    def __init__(
        self, store: SQLiteStore, limits: ReplayLimits, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.limits = limits
        self._store = store
        self._clock = clock or store._clock
        store.run_now(_create)

    async def append_many(self, writes: Sequence[ReplayWrite]) -> list[ValueError | None]:
        now = self._clock()
        limits = self.limits

        def write_all(conn: sqlite3.Connection) -> list[ValueError | None]:
            with _transaction(conn, "IMMEDIATE"):
                conn.execute("DELETE FROM replay_logs WHERE expires_at <= ?", (now,))
                refused: list[ValueError | None] = []
                for write in writes:
                    try:
                        _write(conn, write, now, limits)
                    except ValueError as exc:
                        refused.append(exc)
                    else:
                        refused.append(None)
                return refused

        return await self._store.run(write_all)

    async def read(self, reply_id: str, after: int = -1, *, limit: int = 1000) -> Replay | None:
        now = self._clock()

        def load(conn: sqlite3.Connection) -> Replay | None:
            with _transaction(conn, "DEFERRED"):
                row = conn.execute(
                    "SELECT conversation_id, front, length, done, expires_at FROM replay_logs"
                    " WHERE reply_id = ? AND expires_at > ?",
                    (reply_id, now),
                ).fetchone()
                if row is None:
                    return None
                items = conn.execute(
                    "SELECT item FROM replay_items WHERE reply_id = ? AND position > ?"
                    " ORDER BY position LIMIT ?",
                    (reply_id, after, limit),
                ).fetchall()
            conversation_id, front, length, done, expires_at = row
            meta, age = ReplayMeta(conversation_id, front), now - (expires_at - self.limits.ttl)
            return Replay(meta, after + 1, [i for (i,) in items], length, bool(done), age)

        return await self._store.run(load)

    async def wait(self, reply_id: str, length: int, within: float) -> None:
        await asyncio.sleep(min(within, self.limits.poll_interval))

    async def close(self) -> None:
        return None  # the store closes the connection
