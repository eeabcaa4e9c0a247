"""Replay logs in the SQLite file of the conversations (``CHATSSE_STORE=sqlite:///...``), on
the store's own connection and thread: one writer per machine, readers on any worker.

A batch of appends is one ``BEGIN IMMEDIATE`` transaction of a fixed number of statements,
however many logs it writes: one read of the logs' state, one ``executemany`` of their new
items, each log's new items one row (a *chunk*, a JSON list, with its first position and
count), one of the log rows that change, plus the sweep of expired logs. A log's length is
where its last chunk ends; its row changes only when it is created, completed, or its life is
renewed, which a write does at most once a second (``_RENEW``): a log's age, as a reader sees
it, is then at most a second more than the time since its last write. Reads take the chunks
that overlap the positions asked for.
"""

from __future__ import annotations

import asyncio
import json
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
    done INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS replay_logs_by_expiry ON replay_logs (expires_at);
CREATE TABLE IF NOT EXISTS replay_chunks (
    reply_id TEXT NOT NULL REFERENCES replay_logs (reply_id) ON DELETE CASCADE,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    items TEXT NOT NULL,
    PRIMARY KEY (reply_id, start)
) WITHOUT ROWID;
"""
_BATCH = 500  # logs per read of their state (SQLite's limit on a statement's parameters)
_RENEW = 1.0  # seconds a write may leave a log's life unrenewed
# Where a log's last chunk ends: one step down the primary key's index from its end.
_LENGTH = (
    "(SELECT start + count FROM replay_chunks AS c WHERE c.reply_id = replay_logs.reply_id"
    " ORDER BY start DESC LIMIT 1)"
)
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _create(conn: sqlite3.Connection) -> None:
    with _transaction(conn, "IMMEDIATE"):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)


def _states(conn: sqlite3.Connection, reply_ids: list[str]) -> dict[str, tuple[int, int, float]]:
    """Each log's (length, done, expires_at)."""
    found: dict[str, tuple[int, int, float]] = {}
    for at in range(0, len(reply_ids), _BATCH):
        some = reply_ids[at : at + _BATCH]
        marks = ",".join("?" * len(some))
        for reply_id, length, done, expires_at in conn.execute(
            f"SELECT reply_id, {_LENGTH}, done, expires_at FROM replay_logs WHERE reply_id IN ({marks})", some
        ):
            found[reply_id] = (length or 0, done, expires_at)
    return found


class SQLiteReplayLog:
    """A waiting reader looks again every ``poll_interval`` (other processes write the file)."""

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
                known = _states(conn, list({write.reply_id for write in writes}))
                refused: list[ValueError | None] = []
                logs, chunks = [], []
                renew_before = now + limits.ttl - _RENEW
                for write in writes:
                    length, done, expires_at = known.get(write.reply_id, (0, 0, 0.0))
                    if done:
                        refused.append(None)
                        continue
                    items = write.items
                    try:
                        new = _check_append(length, write.start, len(items), limits.max_items)
                    except ValueError as exc:
                        refused.append(exc)
                        continue
                    refused.append(None)
                    if new:
                        chunks.append((write.reply_id, length, new, _dumps(list(items[len(items) - new :]))))
                    if write.done or expires_at < renew_before:  # new, complete, or due for renewal
                        meta, expires_at = write.meta, now + limits.ttl
                        logs.append(
                            (write.reply_id, meta.conversation_id, meta.front, int(write.done), expires_at)
                        )
                    known[write.reply_id] = (length + new, int(write.done), expires_at)
                conn.executemany(
                    "INSERT INTO replay_logs VALUES (?, ?, ?, ?, ?) ON CONFLICT (reply_id) DO UPDATE"
                    " SET done = excluded.done, expires_at = excluded.expires_at",
                    logs,
                )
                conn.executemany("INSERT INTO replay_chunks VALUES (?, ?, ?, ?)", chunks)
                return refused

        return await self._store.run(write_all)

    async def read(self, reply_id: str, after: int = -1, *, limit: int = 1000) -> Replay | None:
        now = self._clock()
        first = after + 1

        def load(conn: sqlite3.Connection) -> Replay | None:
            with _transaction(conn, "DEFERRED"):
                row = conn.execute(
                    f"SELECT conversation_id, front, {_LENGTH}, done, expires_at FROM replay_logs"
                    " WHERE reply_id = ? AND expires_at > ?",
                    (reply_id, now),
                ).fetchone()
                if row is None:
                    return None
                chunks = conn.execute(
                    "SELECT start, items FROM replay_chunks WHERE reply_id = ? AND start + count > ?"
                    " AND start < ? ORDER BY start",
                    (reply_id, first, first + limit),
                ).fetchall()
            items: list[str] = []
            for start, text in chunks:
                items += json.loads(text)[max(0, first - start) :]
            conversation_id, front, length, done, expires_at = row
            meta, age = ReplayMeta(conversation_id, front), now - (expires_at - self.limits.ttl)
            return Replay(meta, first, items[:limit], length or 0, bool(done), age)

        return await self._store.run(load, read=True)

    async def wait(self, reply_id: str, length: int, within: float) -> None:
        await asyncio.sleep(min(within, self.limits.poll_interval))

    async def close(self) -> None:
        return None  # the store closes the connection
