"""Conversation stores shared by several worker processes: SQLite (one machine) and Redis.

Both keep exactly :class:`~chatsse.conversations.MemoryStore`'s policies (TTL on the last
new message, reads never extend a life, a conversation mid-turn never expires and is dropped
when its turn unlocks it stale, the cap evicts the least recently active unlocked
conversation, ``room_for`` before every append, owner-only unlock). Two deliberate
differences, both from sharing state between processes:

- Turn locks expire after ``lock_ttl`` seconds, so a worker that dies mid-turn does not lock
  its conversation forever. ``lock_ttl`` must exceed the longest turn (the request timeout,
  the shutdown grace period and a margin): a turn that outlives its lock may find another
  turn's message stored before its reply.
- Ties in the activity order (the same clock reading) are broken by conversation id;
  MemoryStore breaks them by the order of the writes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis

from chatsse.conversations import (
    Clock,
    ConversationBusy,
    ConversationFull,
    ConversationLimitReached,
    ConversationNotFound,
    ConversationStore,
    MemoryStore,
)
from chatsse.models import ConversationInfo, Message

__all__ = ["DEFAULT_LOCK_TTL", "RedisStore", "SQLiteStore", "open_store"]

DEFAULT_LOCK_TTL = 600.0
"""Seconds a turn lock survives a worker that died holding it: twice the default
``CHATSSE_REQUEST_TIMEOUT``."""

T = TypeVar("T")


def _check_lock_ttl(lock_ttl: float) -> None:
    if not lock_ttl > 0:
        raise ValueError(f"lock_ttl must be positive (got {lock_ttl!r})")


def _not_found(conversation_id: str) -> ConversationNotFound:
    return ConversationNotFound(f"no conversation {conversation_id}")


def _full(max_messages: int) -> ConversationFull:
    return ConversationFull(f"conversation holds the maximum of {max_messages} messages")


def _limit(max_conversations: int) -> ConversationLimitReached:
    return ConversationLimitReached(f"all {max_conversations} conversations have a turn in progress")


# --- SQLite ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    lock_owner TEXT,
    lock_expires_at REAL
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

# A conversation is locked while its lock has not expired; it is live while it has had a new
# message within the TTL, or is locked. Rows that are not live are invisible to reads and
# deleted by the next write.
_UNLOCKED = "(lock_owner IS NULL OR lock_expires_at <= :now)"
_LIVE = "(updated_at > :deadline OR NOT " + _UNLOCKED + ")"


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


class SQLiteStore:
    """Conversations in one SQLite file that several worker processes open at once.

    WAL mode lets readers run beside the one writer; every read-then-write runs in a
    ``BEGIN IMMEDIATE`` transaction, which takes the database's write lock up front (waiting
    up to ``busy_timeout``), so check and update are atomic across processes. Reads run in a
    deferred transaction (one snapshot) and filter out what the next write will delete.

    sqlite3 calls block, and a connection must stay on one thread, so each store owns one
    worker thread that opens, uses and closes its connection; coroutines hand it work and
    await the result without blocking the event loop. The connection is opened (and the
    schema created) in the constructor, so a bad path fails at start-up.

    Lock expiry uses ``clock``, like the TTL (the processes share one machine's clock).
    ``synchronous=NORMAL``: a power cut may lose the last transactions, never corrupt the file.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float,
        max_conversations: int,
        max_messages: int,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        busy_timeout: float = 5.0,
        clock: Clock = time.time,
    ) -> None:
        _check_lock_ttl(lock_ttl)
        self.path = os.fspath(path)
        self.ttl = ttl
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self.lock_ttl = lock_ttl
        self.evicted = 0
        self._clock = clock
        self._closed = False
        self._pid = os.getpid()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatsse-sqlite")
        try:
            self._conn = self._executor.submit(self._open, busy_timeout).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions, each operation opens its own.
        conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            _enable_wal(conn, busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            with _transaction(conn, "IMMEDIATE"):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the store is closed")
        if os.getpid() != self._pid:  # its thread and connection did not survive the fork
            raise RuntimeError("SQLiteStore used after a fork: open the store in each worker process")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, operation, self._conn)

    def _times(self) -> dict[str, float]:
        now = self._clock()
        return {"now": now, "deadline": now - self.ttl}

    @staticmethod
    def _sweep(conn: sqlite3.Connection, times: dict[str, float]) -> None:
        conn.execute(f"DELETE FROM conversations WHERE updated_at <= :deadline AND {_UNLOCKED}", times)

    @classmethod
    def _sweep_then_unlocked(
        cls, conn: sqlite3.Connection, times: dict[str, float], conversation_id: str
    ) -> bool | None:
        """Expire idle conversations, then: is this one free of a live turn lock? None if it
        does not exist. Call inside a write transaction, so the answer holds until commit."""
        cls._sweep(conn, times)
        row = conn.execute(
            f"SELECT {_UNLOCKED} FROM conversations WHERE id = :id", {**times, "id": conversation_id}
        ).fetchone()
        return None if row is None else bool(row[0])

    async def create(self, conversation_id: str, *, lock_owner: str | None = None) -> ConversationInfo:
        times = self._times()
        now = times["now"]

        def create(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "IMMEDIATE"):
                self._sweep(conn, times)
                if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone():
                    raise ValueError(f"conversation {conversation_id} exists")
                evicted = False
                (count,) = conn.execute("SELECT COUNT(*) FROM conversations").fetchone()
                if count >= self.max_conversations:
                    victim = conn.execute(
                        f"SELECT id FROM conversations WHERE {_UNLOCKED} ORDER BY updated_at, id LIMIT 1",
                        times,
                    ).fetchone()
                    if victim is None:
                        raise _limit(self.max_conversations)
                    conn.execute("DELETE FROM conversations WHERE id = ?", victim)
                    evicted = True
                conn.execute(
                    "INSERT INTO conversations (id, created_at, updated_at, lock_owner, lock_expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        now,
                        now,
                        lock_owner,
                        None if lock_owner is None else now + self.lock_ttl,
                    ),
                )
            return evicted

        if await self._run(create):
            self.evicted += 1
        return ConversationInfo(conversation_id, now, now, 0)

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        times = self._times()

        def info(conn: sqlite3.Connection) -> ConversationInfo | None:
            row = conn.execute(
                "SELECT id, created_at, updated_at, message_count FROM conversations"
                f" WHERE id = :id AND {_LIVE}",
                {**times, "id": conversation_id},
            ).fetchone()
            return None if row is None else ConversationInfo(*row)

        return await self._run(info)

    async def messages(self, conversation_id: str, last: int | None = None) -> list[Message]:
        times = self._times()

        def messages(conn: sqlite3.Connection) -> list[Message]:
            with _transaction(conn, "DEFERRED"):
                row = conn.execute(
                    f"SELECT message_count FROM conversations WHERE id = :id AND {_LIVE}",
                    {**times, "id": conversation_id},
                ).fetchone()
                if row is None:
                    raise _not_found(conversation_id)
                if last is not None and last <= 0:
                    return []
                first = 0 if last is None else row[0] - last
                rows = conn.execute(
                    "SELECT id, role, content, created_at, finish_reason FROM messages"
                    " WHERE conversation_id = ? AND position >= ? ORDER BY position",
                    (conversation_id, first),
                ).fetchall()
            return [Message(*r) for r in rows]

        return await self._run(messages)

    async def append(self, conversation_id: str, message: Message, *, room_for: int = 1) -> None:
        times = self._times()

        def append(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                self._sweep(conn, times)
                row = conn.execute(
                    "SELECT message_count FROM conversations WHERE id = ?", (conversation_id,)
                ).fetchone()
                if row is None:
                    raise _not_found(conversation_id)
                (count,) = row
                if count + room_for > self.max_messages:
                    raise _full(self.max_messages)
                conn.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        count,
                        message.id,
                        message.role,
                        message.content,
                        message.created_at,
                        message.finish_reason,
                    ),
                )
                conn.execute(
                    "UPDATE conversations SET message_count = ?, updated_at = ? WHERE id = ?",
                    (count + 1, times["now"], conversation_id),
                )

        await self._run(append)

    async def delete(self, conversation_id: str) -> bool:
        times = self._times()

        def delete(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "IMMEDIATE"):
                unlocked = self._sweep_then_unlocked(conn, times, conversation_id)
                if unlocked is None:
                    return False
                if not unlocked:
                    raise ConversationBusy("a turn is in progress")
                conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            return True

        return await self._run(delete)

    async def list(self, limit: int) -> list[ConversationInfo]:
        times = self._times()

        def list_(conn: sqlite3.Connection) -> list[ConversationInfo]:
            rows = conn.execute(
                "SELECT id, created_at, updated_at, message_count FROM conversations"
                f" WHERE {_LIVE} ORDER BY updated_at DESC, id DESC LIMIT :limit",
                {**times, "limit": max(limit, 0)},  # a negative LIMIT means no limit in SQLite
            ).fetchall()
            return [ConversationInfo(*row) for row in rows]

        return await self._run(list_)

    async def count(self) -> int:
        times = self._times()

        def count(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(f"SELECT COUNT(*) FROM conversations WHERE {_LIVE}", times).fetchone()
            return int(n)

        return await self._run(count)

    async def try_lock(self, conversation_id: str, owner: str) -> bool:
        times = self._times()

        def try_lock(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "IMMEDIATE"):
                unlocked = self._sweep_then_unlocked(conn, times, conversation_id)
                if unlocked is None:
                    raise _not_found(conversation_id)
                if not unlocked:
                    return False
                conn.execute(
                    "UPDATE conversations SET lock_owner = ?, lock_expires_at = ? WHERE id = ?",
                    (owner, times["now"] + self.lock_ttl, conversation_id),
                )
            return True

        return await self._run(try_lock)

    async def unlock(self, conversation_id: str, owner: str) -> None:
        times = self._times()

        def unlock(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                released = conn.execute(
                    "UPDATE conversations SET lock_owner = NULL, lock_expires_at = NULL"
                    " WHERE id = ? AND lock_owner = ?",
                    (conversation_id, owner),
                ).rowcount
                if released:
                    conn.execute(
                        "DELETE FROM conversations WHERE id = :id AND updated_at <= :deadline",
                        {**times, "id": conversation_id},
                    )

        await self._run(unlock)

    async def close(self) -> None:
        """Close the connection on its thread, then stop the (now idle) thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=True)


# --- Redis ----------------------------------------------------------------------------------

# Every script starts with this prelude. KEYS[1] is the activity sorted set (member: the
# conversation id, score: updated_at); ARGV[1..4] are the key prefix, now, now - ttl and the
# backstop key expiry in ms. A conversation is <prefix>meta:<id> (hash: created_at,
# updated_at), <prefix>messages:<id> (list of JSON messages) and <prefix>lock:<id> (string:
# the owner, with PX lock_ttl). sweep() drops every conversation idle past the TTL whose lock
# key is gone (never held, released, or expired).
_PRELUDE = """
local active, prefix, now, deadline = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local backstop = tonumber(ARGV[4])
local function drop(id)
    redis.call('DEL', prefix .. 'meta:' .. id, prefix .. 'messages:' .. id)
    redis.call('ZREM', active, id)
end
local function locked(id)
    return redis.call('EXISTS', prefix .. 'lock:' .. id) == 1
end
local function sweep()
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', active, '-inf', deadline)) do
        if not locked(id) then drop(id) end
    end
end
local function keep(key)
    if backstop > 0 then redis.call('PEXPIRE', key, backstop) end
end
"""

# KEYS[2..4]: meta, messages, lock. ARGV[5..]: id, max_conversations, lock owner ('' for
# none), lock ms. Returns -2 (id exists), -1 (cap reached, all locked), else evictions (0/1).
_CREATE = """
sweep()
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
local evicted = 0
if redis.call('ZCARD', active) >= tonumber(ARGV[6]) then
    local victim, start = nil, 0
    repeat
        local batch = redis.call('ZRANGE', active, start, start + 99)
        for _, id in ipairs(batch) do
            if not locked(id) then victim = id; break end
        end
        start = start + 100
    until victim or #batch < 100
    if not victim then return -1 end
    drop(victim)
    evicted = 1
end
redis.call('HSET', KEYS[2], 'created_at', now, 'updated_at', now)
redis.call('ZADD', active, now, ARGV[5])
if ARGV[7] ~= '' then redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[8]) end
keep(KEYS[2])
keep(active)
return evicted
"""

# KEYS[2..3]: meta, messages. Returns false, or {created_at, updated_at, message count}.
_INFO = """
sweep()
local meta = redis.call('HMGET', KEYS[2], 'created_at', 'updated_at')
if not meta[1] then return false end
return {meta[1], meta[2], redis.call('LLEN', KEYS[3])}
"""

# KEYS[2..3]: meta, messages. ARGV[5..6]: LRANGE start, stop. Returns {0} or {1, messages}.
_MESSAGES = """
sweep()
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
return {1, redis.call('LRANGE', KEYS[3], ARGV[5], ARGV[6])}
"""

# KEYS[2..3]: meta, messages. ARGV[5..]: id, max_messages, room_for, the message's JSON.
# Returns 0 (not found), -1 (full) or 1.
_APPEND = """
sweep()
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('LLEN', KEYS[3]) + tonumber(ARGV[7]) > tonumber(ARGV[6]) then return -1 end
redis.call('RPUSH', KEYS[3], ARGV[8])
redis.call('HSET', KEYS[2], 'updated_at', now)
redis.call('ZADD', active, now, ARGV[5])
keep(KEYS[2])
keep(KEYS[3])
keep(active)
return 1
"""

# KEYS[2]: meta. ARGV[5]: id. Returns 0 (not found), -1 (locked) or 1.
_DELETE = """
sweep()
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if locked(ARGV[5]) then return -1 end
drop(ARGV[5])
return 1
"""

# ARGV[5]: limit (>= 1). Returns {{id, created_at, updated_at, message count}, ...}.
_LIST = """
sweep()
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', active, 0, tonumber(ARGV[5]) - 1)) do
    local meta = redis.call('HMGET', prefix .. 'meta:' .. id, 'created_at', 'updated_at')
    if meta[1] then
        out[#out + 1] = {id, meta[1], meta[2], redis.call('LLEN', prefix .. 'messages:' .. id)}
    end
end
return out
"""

_COUNT = """
sweep()
return redis.call('ZCARD', active)
"""

# KEYS[2], KEYS[4]: meta, lock. ARGV[5..]: owner, lock ms. Returns -1 (not found), 0 or 1.
_TRY_LOCK = """
sweep()
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('SET', KEYS[4], ARGV[5], 'NX', 'PX', ARGV[6]) then return 1 end
return 0
"""

# KEYS[2], KEYS[4]: meta, lock. ARGV[5..]: id, owner. Compare-and-delete: only the owner
# releases, and a conversation that went stale during the turn goes with its lock.
_UNLOCK = """
if redis.call('GET', KEYS[4]) ~= ARGV[6] then return 0 end
redis.call('DEL', KEYS[4])
local updated = redis.call('HGET', KEYS[2], 'updated_at')
if updated and tonumber(updated) <= tonumber(deadline) then drop(ARGV[5]) end
return 1
"""


def _message_json(message: Message) -> str:
    return json.dumps(message.to_dict(), separators=(",", ":"))


def _message_from_json(text: str) -> Message:
    return Message(**json.loads(text))


class RedisStore:
    """Conversations in Redis, shared by any number of workers on any number of machines.

    Every operation is one Lua script: Redis runs a script atomically, so the expiry sweep,
    the checks and the writes of one operation never interleave with another worker's, and
    each costs one round trip (WATCH/MULTI would retry under contention and take several).
    The TTL runs on ``clock`` (the times are passed in); as a backstop, every key a write
    touches gets a Redis expiry of ``ttl + lock_ttl``, so data abandoned with the deployment
    still goes away. The turn lock is ``SET lock:<id> owner NX PX lock_ttl`` and expires on
    Redis's own clock, one clock for all machines; it is released only by its owner.

    The scripts reach keys of other conversations (sweep, eviction) that they do not declare,
    so this needs a single Redis server (or a primary with replicas), not Redis Cluster.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        max_conversations: int,
        max_messages: int,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        clock: Clock = time.time,
        prefix: str = "chatsse:",
    ) -> None:
        _check_lock_ttl(lock_ttl)
        self.ttl = ttl
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self.lock_ttl = lock_ttl
        self.prefix = prefix
        self.evicted = 0
        self._clock = clock
        self._lock_ms = max(1, round(lock_ttl * 1000))
        backstop = (ttl + lock_ttl) * 1000
        self._backstop_ms = math.ceil(backstop) if math.isfinite(backstop) else 0
        self._redis = Redis.from_url(url, decode_responses=True)
        self._active = prefix + "active"
        script = self._redis.register_script
        self._create = script(_PRELUDE + _CREATE)
        self._info = script(_PRELUDE + _INFO)
        self._messages = script(_PRELUDE + _MESSAGES)
        self._append = script(_PRELUDE + _APPEND)
        self._delete = script(_PRELUDE + _DELETE)
        self._list = script(_PRELUDE + _LIST)
        self._count = script(_PRELUDE + _COUNT)
        self._try_lock = script(_PRELUDE + _TRY_LOCK)
        self._unlock = script(_PRELUDE + _UNLOCK)

    def key(self, kind: str, conversation_id: str) -> str:
        """The Redis key of a conversation's ``meta``, ``messages`` or ``lock``."""
        return f"{self.prefix}{kind}:{conversation_id}"

    def _keys(self, conversation_id: str) -> list[str]:
        return [
            self._active,
            self.key("meta", conversation_id),
            self.key("messages", conversation_id),
            self.key("lock", conversation_id),
        ]

    def _args(self, now: float, *extra: str | int | float) -> list[str | int | float]:
        return [self.prefix, now, now - self.ttl, self._backstop_ms, *extra]

    async def create(self, conversation_id: str, *, lock_owner: str | None = None) -> ConversationInfo:
        now = self._clock()
        args = self._args(now, conversation_id, self.max_conversations, lock_owner or "", self._lock_ms)
        result = await self._create(self._keys(conversation_id), args)
        if result == -2:
            raise ValueError(f"conversation {conversation_id} exists")
        if result == -1:
            raise _limit(self.max_conversations)
        self.evicted += int(result)
        return ConversationInfo(conversation_id, now, now, 0)

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        result = await self._info(self._keys(conversation_id), self._args(self._clock()))
        if not result:
            return None
        created_at, updated_at, count = result
        return ConversationInfo(conversation_id, float(created_at), float(updated_at), int(count))

    async def messages(self, conversation_id: str, last: int | None = None) -> list[Message]:
        if last is None:
            start, stop = 0, -1
        elif last > 0:
            start, stop = -last, -1
        else:
            start, stop = 1, 0  # an empty range, after the existence check
        result = await self._messages(self._keys(conversation_id), self._args(self._clock(), start, stop))
        if result[0] == 0:
            raise _not_found(conversation_id)
        return [_message_from_json(text) for text in result[1]]

    async def append(self, conversation_id: str, message: Message, *, room_for: int = 1) -> None:
        args = self._args(self._clock(), conversation_id, self.max_messages, room_for, _message_json(message))
        result = await self._append(self._keys(conversation_id), args)
        if result == 0:
            raise _not_found(conversation_id)
        if result == -1:
            raise _full(self.max_messages)

    async def delete(self, conversation_id: str) -> bool:
        result = await self._delete(self._keys(conversation_id), self._args(self._clock(), conversation_id))
        if result == -1:
            raise ConversationBusy("a turn is in progress")
        return bool(result == 1)

    async def list(self, limit: int) -> list[ConversationInfo]:
        if limit <= 0:
            return []
        rows: list[list[Any]] = await self._list([self._active], self._args(self._clock(), limit))
        return [
            ConversationInfo(cid, float(created), float(updated), int(n)) for cid, created, updated, n in rows
        ]

    async def count(self) -> int:
        return int(await self._count([self._active], self._args(self._clock())))

    async def try_lock(self, conversation_id: str, owner: str) -> bool:
        args = self._args(self._clock(), owner, self._lock_ms)
        result = await self._try_lock(self._keys(conversation_id), args)
        if result == -1:
            raise _not_found(conversation_id)
        return bool(result == 1)

    async def unlock(self, conversation_id: str, owner: str) -> None:
        await self._unlock(self._keys(conversation_id), self._args(self._clock(), conversation_id, owner))

    async def close(self) -> None:
        await self._redis.aclose()


# --- choosing a store -----------------------------------------------------------------------

_STORE_FORMS = (
    "'memory', 'sqlite:///relative/path.db', 'sqlite:////absolute/path.db', "
    "'redis://host:port/db' or 'rediss://host:port/db'"
)


def _redacted(url: str) -> str:
    """The URL without a password, fit for an error message."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def open_store(
    url: str, *, ttl: float, max_conversations: int, max_messages: int, lock_ttl: float
) -> ConversationStore:
    """The store ``CHATSSE_STORE`` names. ``lock_ttl`` does not apply to ``memory`` (one
    process: a crashed worker takes its locks with it)."""
    if url == "memory":
        return MemoryStore(ttl=ttl, max_conversations=max_conversations, max_messages=max_messages)
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        return SQLiteStore(
            path, ttl=ttl, max_conversations=max_conversations, max_messages=max_messages, lock_ttl=lock_ttl
        )
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(
            url, ttl=ttl, max_conversations=max_conversations, max_messages=max_messages, lock_ttl=lock_ttl
        )
    raise ValueError(f"CHATSSE_STORE: expected {_STORE_FORMS} (got {_redacted(url)!r})")
