"""Conversations in one SQLite file shared by the worker processes of one machine:
``CHATSSE_STORE=sqlite:///path.db``."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from chatsse.errors import StorageUnavailable
from chatsse.models import ConversationInfo, Message
from chatsse.stores.base import (
    StoreLimits,
    _busy,
    _full,
    _limit_reached,
    _lost_reply,
    _not_found,
    _room_needed,
    _turn_lost,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")
Clock = Callable[[], float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    lock_owner TEXT,
    lock_expires_at REAL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS conversations_by_activity ON conversations (updated_at, id);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    finish_reason TEXT,
    PRIMARY KEY (conversation_id, position)
) WITHOUT ROWID;
"""

# ``lock_owner`` is the token of the turn that holds, or last held, the lock: it stays after
# the lock expires (``lock_expires_at``) until that turn finishes or is cancelled, so a later
# turn knows the earlier one never stored its reply. A conversation is live while it has had
# a new message within the TTL, or its lock is held. Rows that are not live are invisible to
# reads and deleted by the next write that sweeps.
_UNLOCKED = "(lock_owner IS NULL OR lock_expires_at <= :now)"
_LIVE = "(updated_at > :deadline OR NOT " + _UNLOCKED + ")"
_COLUMNS = "id, role, content, created_at, finish_reason"
# A file made before conversations had owners gains the column (its conversations: the
# anonymous owner's); the owner index is made after that.
_OWNER_INDEX = "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated_at, id)"


@contextmanager
def _transaction(conn: sqlite3.Connection, kind: str) -> Iterator[None]:
    conn.execute(f"BEGIN {kind}")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch the database file to WAL (once set, it stays set for every connection).

    The switch needs the file to itself, and SQLite reports "database is locked" at once,
    without waiting on the busy timeout, when another process is opening the same new file
    at that moment (several workers starting together): retry until ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _append(conn: sqlite3.Connection, conversation_id: str, position: int, message: Message) -> None:
    conn.execute(
        "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            conversation_id,
            position,
            message.id,
            message.role,
            message.content,
            message.created_at,
            message.finish_reason,
        ),
    )


def _last_messages(conn: sqlite3.Connection, conversation_id: str, count: int, last: int) -> list[Message]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE conversation_id = ? AND position >= ? ORDER BY position",
        (conversation_id, count - last),
    ).fetchall()
    return [Message(*row) for row in rows]


def _last_id(conn: sqlite3.Connection, conversation_id: str, count: int) -> str | None:
    row = conn.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND position = ?", (conversation_id, count - 1)
    ).fetchone()
    return None if row is None else str(row[0])


class SQLiteStore:
    """Conversations in one SQLite file that several worker processes open at once.

    WAL mode lets readers run beside the one writer; every write runs in one ``BEGIN
    IMMEDIATE`` transaction, which takes the database's write lock up front (waiting up to
    ``timeout`` seconds for another process's), so check and update are atomic across
    processes. Reads run in a deferred transaction (one snapshot) and leave out what the next
    write will delete.

    sqlite3 calls block, and a connection must stay on one thread, so each store owns one
    worker thread that opens, uses and closes its connection; coroutines hand it work and
    await the result without blocking the event loop. Calls run in the order they are made:
    a ``cancel_turn`` made after a ``begin_turn`` whose caller stopped waiting runs after it.
    The connection is opened (and the schema created) in the constructor, so a bad path
    fails at start-up. Failures of SQLite are raised as ``StorageUnavailable``.

    Lock expiry uses ``clock``, like the TTL (the processes share one machine's clock).
    ``synchronous=NORMAL``: a power cut may lose the last transactions, never corrupt the file.
    """

    name = "sqlite"
    local = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        limits: StoreLimits,
        *,
        timeout: float = 5.0,
        clock: Clock = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.limits = limits
        self.evicted = 0
        self._clock = clock
        self._closed = False
        self._pid = os.getpid()
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatsse-sqlite")
        try:
            self._conn = self._executor.submit(self._open, timeout).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        # Reads on a connection and thread of their own: a write waiting for another process's
        # lock (up to the busy timeout) holds up the writer's thread, and under WAL a reader
        # needs no lock, so reads answer meanwhile. Opened on first use.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatsse-sqlite-read")
        self._read_conn: sqlite3.Connection | None = None

    def _open(self, timeout: float) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions, each operation opens its own.
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        try:
            _enable_wal(conn, timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            with _transaction(conn, "IMMEDIATE"):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(conversations)")}
                if "owner" not in columns:
                    conn.execute("ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
                conn.execute(_OWNER_INDEX)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _on_reader(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._read_conn is None:
            self._read_conn = self._open_reader()
        return operation(self._read_conn)

    async def _run(self, operation: Callable[[sqlite3.Connection], T], *, read: bool = False) -> T:
        """``operation`` on the writer's connection and thread, or with ``read`` on the
        reader's (an in-memory database has one connection: its reads stay on the writer's)."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if os.getpid() != self._pid:  # its thread and connection did not survive the fork
            raise RuntimeError("SQLiteStore used after a fork: open the store in each worker process")
        loop = asyncio.get_running_loop()
        try:
            if read and self.path != ":memory:":
                return await loop.run_in_executor(self._reader, self._on_reader, operation)
            return await loop.run_in_executor(self._executor, operation, self._conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"the SQLite store failed: {type(exc).__name__}: {exc}") from exc

    async def run(self, operation: Callable[[sqlite3.Connection], T], *, read: bool = False) -> T:
        """Run ``operation`` on the store's connection, on its thread, or with ``read`` (it
        writes nothing) on the reader's (for the replay log, the limits and the signals, which
        keep their tables in the same file)."""
        return await self._run(operation, read=read)

    def run_now(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """The same, blocking the caller: for set-up, before the event loop runs."""
        return self._executor.submit(operation, self._conn).result()

    def _times(self) -> dict[str, float]:
        now = self._clock()
        return {"now": now, "deadline": now - self.limits.ttl}

    @staticmethod
    def _sweep(conn: sqlite3.Connection, times: dict[str, float]) -> None:
        conn.execute(f"DELETE FROM conversations WHERE updated_at <= :deadline AND {_UNLOCKED}", times)

    def _insert(
        self,
        conn: sqlite3.Connection,
        conversation_id: str,
        times: dict[str, float],
        token: str | None,
        owner: str,
    ) -> bool:
        """Insert an empty conversation (locked for ``token``), evicting at the cap; True if it
        evicted one. Call inside a write transaction, after a sweep."""
        if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone():
            raise ValueError(f"conversation {conversation_id} exists")
        evicted = False
        (count,) = conn.execute("SELECT COUNT(*) FROM conversations").fetchone()
        if count >= self.limits.max_conversations:
            victim = conn.execute(
                f"SELECT id FROM conversations WHERE {_UNLOCKED} ORDER BY updated_at, id LIMIT 1", times
            ).fetchone()
            if victim is None:
                raise _limit_reached(self.limits.max_conversations)
            conn.execute("DELETE FROM conversations WHERE id = ?", victim)
            evicted = True
        now = times["now"]
        conn.execute(
            "INSERT INTO conversations (id, created_at, updated_at, lock_owner, lock_expires_at, owner)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, now, now, token, None if token is None else now + self.limits.lock_ttl, owner),
        )
        return evicted

    async def begin_turn(
        self, conversation_id: str, user: Message, *, token: str, new: bool, history: int, owner: str = ""
    ) -> list[Message]:
        times = self._times()
        now = times["now"]
        max_messages = self.limits.max_messages

        def begin(conn: sqlite3.Connection) -> tuple[bool, list[Message]]:
            evicted = False
            with _transaction(conn, "IMMEDIATE"):
                self._sweep(conn, times)
                row = conn.execute(
                    "SELECT message_count, lock_owner, lock_expires_at, owner FROM conversations"
                    " WHERE id = ?",
                    (conversation_id,),
                ).fetchone()
                if row is not None and row[3] != owner and not new:
                    row = None  # another owner's: not there
                if row is not None and row[1] == token:  # a retried call: the turn has begun
                    return False, _last_messages(conn, conversation_id, row[0], history)
                if new:
                    if _room_needed(False) > max_messages:
                        raise _full(max_messages)
                    evicted = self._insert(conn, conversation_id, times, token, owner)
                    count = 0
                else:
                    if row is None:
                        raise _not_found(conversation_id)
                    count, orphaned, expires_at, _ = row
                    if orphaned is not None and expires_at > now:
                        raise _busy(conversation_id)
                    if count + _room_needed(orphaned is not None) > max_messages:
                        raise _full(max_messages)
                    if orphaned is not None:
                        _append(conn, conversation_id, count, _lost_reply(orphaned, now))
                        count += 1
                _append(conn, conversation_id, count, user)
                conn.execute(
                    "UPDATE conversations SET message_count = ?, updated_at = ?, lock_owner = ?,"
                    " lock_expires_at = ? WHERE id = ?",
                    (count + 1, now, token, now + self.limits.lock_ttl, conversation_id),
                )
                return evicted, _last_messages(conn, conversation_id, count + 1, history)

        evicted, prompt = await self._run(begin)
        self.evicted += evicted
        return prompt

    async def finish_turn(self, conversation_id: str, reply: Message, *, token: str) -> None:
        now = self._clock()

        def finish(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                row = conn.execute(
                    "SELECT message_count, lock_owner FROM conversations WHERE id = ?", (conversation_id,)
                ).fetchone()
                if row is None or row[1] != token:
                    if row is not None and _last_id(conn, conversation_id, row[0]) == reply.id:
                        return  # a retried call: the reply is stored
                    raise _turn_lost(conversation_id)
                (count, _) = row
                _append(conn, conversation_id, count, reply)
                conn.execute(
                    "UPDATE conversations SET message_count = ?, updated_at = ?, lock_owner = NULL,"
                    " lock_expires_at = NULL WHERE id = ?",
                    (count + 1, now, conversation_id),
                )

        await self._run(finish)

    async def cancel_turn(self, conversation_id: str, *, token: str, user_message_id: str, new: bool) -> bool:
        times = self._times()

        def cancel(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "IMMEDIATE"):
                row = conn.execute(
                    "SELECT message_count, updated_at FROM conversations WHERE id = ? AND lock_owner = ?",
                    (conversation_id, token),
                ).fetchone()
                if row is None:
                    return False
                count, updated_at = row
                if new or updated_at <= times["deadline"]:
                    conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
                    return True
                if _last_id(conn, conversation_id, count) == user_message_id:
                    conn.execute(
                        "DELETE FROM messages WHERE conversation_id = ? AND position = ?",
                        (conversation_id, count - 1),
                    )
                    count -= 1
                conn.execute(
                    "UPDATE conversations SET message_count = ?, lock_owner = NULL, lock_expires_at = NULL"
                    " WHERE id = ?",
                    (count, conversation_id),
                )
                return True

        return await self._run(cancel)

    async def create(self, conversation_id: str, *, owner: str = "") -> ConversationInfo:
        times = self._times()
        now = times["now"]

        def create(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "IMMEDIATE"):
                self._sweep(conn, times)
                return self._insert(conn, conversation_id, times, None, owner)

        self.evicted += await self._run(create)
        return ConversationInfo(conversation_id, now, now, 0)

    async def info(self, conversation_id: str, *, owner: str = "") -> ConversationInfo | None:
        times = self._times()

        def info(conn: sqlite3.Connection) -> ConversationInfo | None:
            row = conn.execute(
                "SELECT id, created_at, updated_at, message_count FROM conversations"
                f" WHERE id = :id AND owner = :owner AND {_LIVE}",
                {**times, "id": conversation_id, "owner": owner},
            ).fetchone()
            return None if row is None else ConversationInfo(*row)

        return await self._run(info, read=True)

    async def messages(
        self, conversation_id: str, last: int | None = None, *, owner: str = ""
    ) -> list[Message]:
        times = self._times()

        def messages(conn: sqlite3.Connection) -> list[Message]:
            with _transaction(conn, "DEFERRED"):
                row = conn.execute(
                    f"SELECT message_count FROM conversations WHERE id = :id AND owner = :owner AND {_LIVE}",
                    {**times, "id": conversation_id, "owner": owner},
                ).fetchone()
                if row is None:
                    raise _not_found(conversation_id)
                if last is not None and last <= 0:
                    return []
                return _last_messages(conn, conversation_id, row[0], row[0] if last is None else last)

        return await self._run(messages, read=True)

    async def delete(self, conversation_id: str, *, owner: str = "") -> bool:
        times = self._times()

        def delete(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "IMMEDIATE"):
                self._sweep(conn, times)
                row = conn.execute(
                    f"SELECT {_UNLOCKED} FROM conversations WHERE id = :id AND owner = :owner",
                    {**times, "id": conversation_id, "owner": owner},
                ).fetchone()
                if row is None:
                    return False
                if not row[0]:
                    raise _busy(conversation_id)
                conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            return True

        return await self._run(delete)

    async def list(self, limit: int, *, owner: str = "") -> list[ConversationInfo]:
        times = self._times()

        def list_(conn: sqlite3.Connection) -> list[ConversationInfo]:
            rows = conn.execute(
                "SELECT id, created_at, updated_at, message_count FROM conversations"
                f" WHERE owner = :owner AND {_LIVE} ORDER BY updated_at DESC, id DESC LIMIT :limit",
                # a negative LIMIT means no limit in SQLite
                {**times, "limit": max(limit, 0), "owner": owner},
            ).fetchall()
            return [ConversationInfo(*row) for row in rows]

        return await self._run(list_, read=True)

    async def count(self, *, owner: str | None = None) -> int:
        times = self._times()
        whose = "" if owner is None else " AND owner = :owner"

        def count(conn: sqlite3.Connection) -> int:
            # Two index range counts (on updated_at, or owner and updated_at), not a scan of
            # every row: the fresh ones, and the stale ones whose lock is held.
            (fresh,) = conn.execute(
                f"SELECT COUNT(*) FROM conversations WHERE updated_at > :deadline{whose}",
                {**times, "owner": owner},
            ).fetchone()
            (held,) = conn.execute(
                "SELECT COUNT(*) FROM conversations WHERE updated_at <= :deadline"
                f" AND lock_owner IS NOT NULL AND lock_expires_at > :now{whose}",
                {**times, "owner": owner},
            ).fetchone()
            return int(fresh + held)

        return await self._run(count, read=True)

    async def close(self) -> None:
        """Close the connection on its thread, then stop the (now idle) thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
            if self._read_conn is not None:
                await loop.run_in_executor(self._reader, self._read_conn.close)
        finally:
            self._executor.shutdown(wait=True)
            self._reader.shutdown(wait=True)
