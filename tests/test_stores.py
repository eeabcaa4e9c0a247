"""One behaviour suite for every conversation store: MemoryStore (the reference), SQLiteStore
(a file in tmp_path) and RedisStore (a real redis-server, flushed before each test), all on a
fake clock; then what only shared stores do (lock expiry, several store objects and several
processes on one database), and open_store.

Lock expiry: SQLiteStore's runs on the store's clock (the fake one here); RedisStore's is
Redis's own PX expiry, on Redis's clock, so its tests use a 0.5 s lock and really wait.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis_server import MISSING, redis_server, redis_server_binary
from support import FakeClock

from chatsse.conversations import (
    ConversationBusy,
    ConversationFull,
    ConversationLimitReached,
    ConversationManager,
    ConversationNotFound,
    MemoryStore,
    Turn,
)
from chatsse.models import ConversationInfo, FinishReason, Message, Role
from chatsse.stores import DEFAULT_LOCK_TTL, RedisStore, SQLiteStore, open_store

TTL = 60.0
KINDS = ["memory", "sqlite", "redis"]
SHARED = ["sqlite", "redis"]
# How long a lock lives in the lock-expiry tests on Redis (real seconds).
REDIS_LOCK_TTL = 0.5

Store = MemoryStore | SQLiteStore | RedisStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


@pytest.mark.parametrize(("required", "outcome"), [("", pytest.skip.Exception), ("1", pytest.fail.Exception)])
def test_missing_redis_server_skips_or_under_ci_fails(
    required: str, outcome: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CHATSSE_REQUIRE_BINARIES", required)
    with pytest.raises(outcome) as error:
        redis_server_binary()
    assert str(error.value) == MISSING


@dataclass
class Database:
    """Where one test's stores live: a kind, and the URLs of two fresh, empty databases."""

    kind: str
    url: str
    other_url: str


@pytest.fixture(params=KINDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    kind: str = request.param
    if kind == "memory":
        return Database(kind, "memory", "memory")
    if kind == "sqlite":
        return Database(kind, f"sqlite:///{tmp_path / 'chat.db'}", f"sqlite:///{tmp_path / 'other.db'}")
    url: str = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(url) as client:
        client.flushall()
    return Database(kind, url, url.removesuffix("/0") + "/1")


@dataclass
class Backend:
    """Makes stores on the test's database (several SQLite or Redis stores share it) and
    closes them after the test."""

    database: Database
    clock: FakeClock
    stores: list[Store] = field(default_factory=list)
    short_lock_ttl: float = 0.0

    @property
    def kind(self) -> str:
        return self.database.kind

    def make(
        self,
        *,
        ttl: float = TTL,
        max_conversations: int = 100,
        max_messages: int = 100,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        prefix: str = "chatsse:",
    ) -> Store:
        limits: dict[str, Any] = {
            "ttl": ttl,
            "max_conversations": max_conversations,
            "max_messages": max_messages,
            "clock": self.clock,
        }
        store: Store
        if self.kind == "memory":
            store = MemoryStore(**limits)
        elif self.kind == "sqlite":
            store = SQLiteStore(self.database.url.removeprefix("sqlite:///"), lock_ttl=lock_ttl, **limits)
        else:
            store = RedisStore(self.database.url, lock_ttl=lock_ttl, prefix=prefix, **limits)
        self.stores.append(store)
        return store

    def make_short_locked(self, sqlite_lock_ttl: float, **limits: Any) -> Store:
        """A store whose locks expire soon: after ``sqlite_lock_ttl`` fake seconds (SQLite),
        after ``REDIS_LOCK_TTL`` real seconds (Redis)."""
        self.short_lock_ttl = sqlite_lock_ttl if self.kind == "sqlite" else REDIS_LOCK_TTL
        return self.make(lock_ttl=self.short_lock_ttl, **limits)

    async def expire_locks(self) -> None:
        """Let the locks of a :meth:`make_short_locked` store expire."""
        if self.kind == "sqlite":
            self.clock.advance(self.short_lock_ttl)
        else:
            await asyncio.sleep(self.short_lock_ttl * 1.5)


@pytest.fixture
async def backend(database: Database, clock: FakeClock) -> AsyncIterator[Backend]:
    made = Backend(database, clock)
    yield made
    for store in made.stores:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.make()


shared_only = pytest.mark.parametrize("database", SHARED, indirect=True)

_counter = iter(range(10**9))


def message(content: str, role: Role = "user", finish_reason: FinishReason | None = None) -> Message:
    return Message(f"msg{next(_counter)}", role, content, 0.0, finish_reason)


async def ids(store: Store, limit: int = 1000) -> list[str]:
    return [info.id for info in await store.list(limit)]


def manager_on(store: Store, clock: Callable[[], float], max_history: int = 20) -> ConversationManager:
    return ConversationManager(store, max_history=max_history, clock=clock)


# --- basics --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_name(backend: Backend, store: Store) -> None:
    assert store.name == backend.kind


@pytest.mark.anyio
async def test_create_and_info(store: Store, clock: FakeClock) -> None:
    created = await store.create("c1")
    assert created == ConversationInfo("c1", clock.now, clock.now, 0)
    clock.advance(1)
    assert await store.info("c1") == created
    assert await store.info("nope") is None
    assert await store.count() == 1


@pytest.mark.anyio
async def test_create_existing_id_is_refused(store: Store) -> None:
    await store.create("c1")
    with pytest.raises(ValueError, match="c1"):
        await store.create("c1")
    assert await store.count() == 1


@pytest.mark.anyio
async def test_append_and_messages_in_order(store: Store, clock: FakeClock) -> None:
    await store.create("c1")
    sent = [message("one"), message("two", "assistant", "stop"), message("three")]
    for i, m in enumerate(sent):
        clock.advance(1)
        await store.append("c1", m)
        assert await store.info("c1") == ConversationInfo("c1", clock.now - i - 1, clock.now, i + 1)
    assert await store.messages("c1") == sent


@pytest.mark.anyio
@pytest.mark.parametrize("last", [-1, 0, 1, 2, 5, 9])
async def test_messages_last_n(store: Store, last: int) -> None:
    await store.create("c1")
    sent = [message(str(i)) for i in range(5)]
    for m in sent:
        await store.append("c1", m)
    assert await store.messages("c1", last=last) == (sent[-last:] if last > 0 else [])
    assert await store.messages("c1", last=None) == sent


@pytest.mark.anyio
async def test_messages_round_trip_exactly(store: Store) -> None:
    contents = ["", "\x00", "a\r\nb\n\n", "\u2028 \ufeff ünïcödé 🚀", '{"json": [1, "x"]}', "x" * 20_000]
    times = [0.0, 1e-9, 1_795_767_861.123456, 1 / 3, 10**12 + 0.5, 7.0]
    reasons: list[FinishReason | None] = [None, "stop", None, "length", None, "interrupted"]
    sent = [
        Message(f"id-{i}", "user" if reason is None else "assistant", text, created, reason)
        for i, (text, created, reason) in enumerate(zip(contents, times, reasons, strict=True))
    ]
    await store.create("c1")
    for m in sent:
        await store.append("c1", m)
    assert await store.messages("c1") == sent


@pytest.mark.anyio
async def test_unknown_conversation(store: Store) -> None:
    assert await store.info("nope") is None
    with pytest.raises(ConversationNotFound):
        await store.messages("nope")
    with pytest.raises(ConversationNotFound):
        await store.messages("nope", last=0)
    with pytest.raises(ConversationNotFound):
        await store.append("nope", message("x"))
    with pytest.raises(ConversationNotFound):
        await store.try_lock("nope", "t1")
    assert await store.delete("nope") is False
    await store.unlock("nope", "t1")
    assert await store.count() == 0


@pytest.mark.anyio
async def test_delete(store: Store) -> None:
    await store.create("c1")
    await store.append("c1", message("hi"))
    await store.create("c2")
    assert await store.delete("c1") is True
    assert await store.info("c1") is None
    with pytest.raises(ConversationNotFound):
        await store.messages("c1")
    assert await store.count() == 1
    assert await store.delete("c1") is False
    assert await ids(store) == ["c2"]
    await store.create("c1")  # the id is free again, with no old messages
    assert await store.messages("c1") == []


@pytest.mark.anyio
async def test_list_is_most_recent_activity_first(store: Store, clock: FakeClock) -> None:
    for cid in ("a", "b", "c"):
        await store.create(cid)
        clock.advance(1)
    assert await ids(store) == ["c", "b", "a"]
    await store.append("a", message("hi"))
    assert await ids(store) == ["a", "c", "b"]
    infos = await store.list(100)
    assert infos[0] == ConversationInfo("a", clock.now - 3, clock.now, 1)
    assert await ids(store, limit=2) == ["a", "c"]
    assert await ids(store, limit=0) == []
    assert await ids(store, limit=-1) == []


@pytest.mark.anyio
async def test_count(store: Store) -> None:
    assert await store.count() == 0
    for i in range(4):
        await store.create(f"c{i}")
    assert await store.count() == 4


# --- message limit ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_room_for_and_conversation_full(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_messages=3)
    await store.create("c1")
    await store.append("c1", message("one"), room_for=2)
    await store.append("c1", message("two", "assistant"))
    updated = clock.now
    clock.advance(1)
    with pytest.raises(ConversationFull):
        await store.append("c1", message("three"), room_for=2)
    info = await store.info("c1")
    assert info is not None
    assert (info.message_count, info.updated_at) == (2, updated)  # a refusal stores nothing
    await store.append("c1", message("three"))
    with pytest.raises(ConversationFull):
        await store.append("c1", message("four"))
    assert [m.content for m in await store.messages("c1")] == ["one", "two", "three"]


# --- expiry ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_idle_conversation_expires_after_ttl(store: Store, clock: FakeClock) -> None:
    await store.create("old")
    await store.append("old", message("hi"))
    clock.advance(TTL / 2)
    await store.create("young")
    clock.advance(TTL / 2 - 1)
    assert await store.info("old") is not None
    assert await store.count() == 2
    clock.advance(1)  # exactly TTL: gone
    assert await store.info("old") is None
    assert await store.count() == 1
    assert await ids(store) == ["young"]
    with pytest.raises(ConversationNotFound):
        await store.messages("old")
    with pytest.raises(ConversationNotFound):
        await store.append("old", message("too late"))
    with pytest.raises(ConversationNotFound):
        await store.try_lock("old", "t1")
    assert await store.delete("old") is False
    await store.create("old")  # the id is free again
    assert await store.messages("old") == []


@pytest.mark.anyio
async def test_reads_do_not_extend_life(store: Store, clock: FakeClock) -> None:
    await store.create("c1")
    await store.append("c1", message("hi"))
    for _ in range(5):
        clock.advance(TTL / 6)
        assert await store.info("c1") is not None
        assert await store.messages("c1")
        assert await store.messages("c1", last=1)
        assert await ids(store) == ["c1"]
        assert await store.count() == 1
    clock.advance(TTL / 6 + 1)
    assert await store.info("c1") is None


@pytest.mark.anyio
async def test_appends_extend_life(store: Store, clock: FakeClock) -> None:
    await store.create("c1")
    clock.advance(TTL - 1)
    await store.append("c1", message("still here"))
    clock.advance(TTL - 1)
    assert await store.info("c1") is not None
    clock.advance(2)
    assert await store.info("c1") is None


@pytest.mark.anyio
async def test_locks_do_not_extend_life(store: Store, clock: FakeClock) -> None:
    await store.create("c1")
    clock.advance(TTL - 1)
    assert await store.try_lock("c1", "t1")
    await store.unlock("c1", "t1")
    clock.advance(1)
    assert await store.info("c1") is None


@pytest.mark.anyio
async def test_locked_conversation_does_not_expire(store: Store, clock: FakeClock) -> None:
    await store.create("turning", lock_owner="t1")
    await store.create("idle")
    assert await store.try_lock("idle", "t2")
    clock.advance(TTL * 3)
    await store.create("new")  # a write, which sweeps expired conversations
    assert await store.info("turning") is not None
    assert await store.messages("idle") == []
    assert await store.count() == 3
    await store.append("idle", message("reply"))  # the turn stores its reply: alive again
    await store.unlock("idle", "t2")
    assert await store.info("idle") is not None
    await store.unlock("turning", "t1")  # released stale: deleted with its lock
    assert await store.info("turning") is None
    clock.advance(TTL)
    assert await store.count() == 0


@pytest.mark.anyio
async def test_stale_unlock_deletes(store: Store, clock: FakeClock) -> None:
    await store.create("c1", lock_owner="t1")
    await store.append("c1", message("q"))
    clock.advance(TTL + 1)
    await store.unlock("c1", "someone else")
    assert await store.info("c1") is not None
    await store.unlock("c1", "t1")
    assert await store.info("c1") is None
    assert await store.count() == 0


# --- the cap -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cap_evicts_least_recently_active(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=3)
    for cid in ("a", "b", "c"):
        await store.create(cid)
        clock.advance(1)
    await store.append("a", message("keeps a alive"))
    clock.advance(1)
    await store.create("d")
    assert store.evicted == 1
    assert await store.count() == 3
    assert await store.info("b") is None
    assert await ids(store) == ["d", "a", "c"]
    await store.create("e")
    assert store.evicted == 2
    assert await store.info("c") is None


@pytest.mark.anyio
async def test_cap_skips_locked_conversations(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=3)
    await store.create("a", lock_owner="turn")
    clock.advance(1)
    await store.create("b")
    clock.advance(1)
    await store.create("c")
    assert await store.try_lock("c", "turn 2")
    clock.advance(1)
    await store.create("d")
    assert store.evicted == 1
    assert await store.info("a") is not None
    assert await store.info("b") is None
    assert sorted(await ids(store)) == ["a", "c", "d"]


@pytest.mark.anyio
async def test_cap_reached_with_every_conversation_locked(backend: Backend) -> None:
    store = backend.make(max_conversations=2)
    await store.create("a", lock_owner="t1")
    await store.create("b")
    assert await store.try_lock("b", "t2")
    with pytest.raises(ConversationLimitReached):
        await store.create("c")
    with pytest.raises(ConversationLimitReached):
        await store.create("c", lock_owner="t3")
    assert store.evicted == 0
    assert await store.count() == 2
    assert await store.info("c") is None
    await store.unlock("b", "t2")
    await store.create("c")
    assert await store.info("b") is None
    assert store.evicted == 1


@pytest.mark.anyio
async def test_expired_conversations_are_not_counted_as_evicted(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=2)
    await store.create("a")
    await store.create("b")
    clock.advance(TTL + 1)
    await store.create("c")
    assert store.evicted == 0
    assert await ids(store) == ["c"]


# --- locks -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_delete_of_locked_conversation_is_busy(store: Store) -> None:
    await store.create("c1", lock_owner="t1")
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    assert await store.info("c1") is not None
    await store.unlock("c1", "t1")
    assert await store.delete("c1") is True


@pytest.mark.anyio
async def test_try_lock_twice(store: Store) -> None:
    await store.create("c1")
    assert await store.try_lock("c1", "t1") is True
    assert await store.try_lock("c1", "t2") is False
    assert await store.try_lock("c1", "t1") is False  # not re-entrant either
    await store.unlock("c1", "t1")
    assert await store.try_lock("c1", "t2") is True


@pytest.mark.anyio
async def test_created_locked(store: Store) -> None:
    await store.create("c1", lock_owner="t1")
    assert await store.try_lock("c1", "t2") is False
    await store.unlock("c1", "t1")
    assert await store.try_lock("c1", "t2") is True


@pytest.mark.anyio
async def test_unlock_by_non_owner_does_nothing(store: Store) -> None:
    await store.create("c1")
    assert await store.try_lock("c1", "owner")
    await store.unlock("c1", "intruder")
    assert await store.try_lock("c1", "other") is False
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    await store.unlock("c1", "owner")
    assert await store.try_lock("c1", "other") is True


# --- the manager on each store ------------------------------------------------------------------


@pytest.mark.anyio
async def test_manager_turns(store: Store, clock: FakeClock) -> None:
    manager = manager_on(store, clock)
    turn = await manager.begin_turn(None, "question")
    assert turn.created_conversation is True
    assert turn.prompt == [turn.user_message]
    assert await store.try_lock(turn.conversation_id, "someone else") is False
    clock.advance(2)
    reply = await manager.finish_turn(turn, "an answer", "length")
    assert reply == Message(turn.reply_id, "assistant", "an answer", clock.now, "length")
    assert await manager.messages(turn.conversation_id) == [turn.user_message, reply]

    nxt = await manager.begin_turn(turn.conversation_id, "follow-up")
    assert nxt.created_conversation is False
    assert nxt.prompt == [turn.user_message, reply, nxt.user_message]
    with pytest.raises(ConversationBusy):
        await manager.begin_turn(turn.conversation_id, "too early")
    await manager.finish_turn(nxt, "", "interrupted")
    assert [m.content for m in await manager.messages(turn.conversation_id, 1)] == [""]
    assert await manager.delete(turn.conversation_id) is True
    assert await manager.count() == 0


@pytest.mark.anyio
async def test_prompt_is_trimmed_to_max_history(store: Store, clock: FakeClock) -> None:
    manager = manager_on(store, clock, max_history=3)
    turn = await manager.begin_turn(None, "u0")
    conv = turn.conversation_id
    await manager.finish_turn(turn, "a0", "stop")
    for i in range(1, 4):
        turn = await manager.begin_turn(conv, f"u{i}")
        assert turn.prompt == (await manager.messages(conv))[-3:]
        await manager.finish_turn(turn, f"a{i}", "stop")
    assert [m.content for m in turn.prompt] == ["u2", "a2", "u3"]
    assert len(await manager.messages(conv)) == 8


@pytest.mark.anyio
async def test_full_new_conversation_is_deleted(backend: Backend, clock: FakeClock) -> None:
    manager = manager_on(backend.make(max_messages=1), clock)
    with pytest.raises(ConversationFull):
        await manager.begin_turn(None, "no room for the reply")
    assert await manager.count() == 0


@pytest.mark.anyio
async def test_turn_without_room_for_its_reply_fails_before_storing(
    backend: Backend, clock: FakeClock
) -> None:
    store = backend.make(max_messages=3)
    manager = manager_on(store, clock)
    turn = await manager.begin_turn(None, "q1")
    await manager.finish_turn(turn, "a1", "stop")
    with pytest.raises(ConversationFull):
        await manager.begin_turn(turn.conversation_id, "q2")
    assert [m.content for m in await manager.messages(turn.conversation_id)] == ["q1", "a1"]
    assert await store.try_lock(turn.conversation_id, "next turn") is True


@pytest.mark.anyio
async def test_refused_turn_does_not_extend_life(backend: Backend, clock: FakeClock) -> None:
    manager = manager_on(backend.make(max_messages=2), clock)
    turn = await manager.begin_turn(None, "q1")
    await manager.finish_turn(turn, "a1", "stop")
    clock.advance(TTL - 10)
    with pytest.raises(ConversationFull):
        await manager.begin_turn(turn.conversation_id, "q2")
    clock.advance(10)
    assert await manager.get(turn.conversation_id) is None


@pytest.mark.anyio
@pytest.mark.parametrize("clients", [2, 8])
async def test_concurrent_turns_on_one_conversation(store: Store, clock: FakeClock, clients: int) -> None:
    manager = manager_on(store, clock)
    info = await manager.create()
    results = await asyncio.gather(
        *(manager.begin_turn(info.id, f"from client {i}") for i in range(clients)), return_exceptions=True
    )
    turns = [r for r in results if isinstance(r, Turn)]
    assert len(turns) == 1
    assert all(isinstance(r, ConversationBusy) for r in results if r is not turns[0])
    assert await manager.messages(info.id) == [turns[0].user_message]
    await manager.finish_turn(turns[0], "reply", "stop")
    assert len(await manager.messages(info.id)) == 2


@pytest.mark.anyio
async def test_concurrent_new_conversations_respect_the_cap(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=5)
    manager = manager_on(store, clock)
    results = await asyncio.gather(
        *(manager.begin_turn(None, f"hello {i}") for i in range(20)), return_exceptions=True
    )
    turns = [r for r in results if isinstance(r, Turn)]
    assert len(turns) == 5  # every conversation is mid-turn: nothing can be evicted
    assert sum(isinstance(r, ConversationLimitReached) for r in results) == 15
    assert await store.count() == 5
    for turn in turns:
        await manager.finish_turn(turn, "reply", "stop")
    await manager.begin_turn(None, "one more")
    assert (await store.count(), store.evicted) == (5, 1)


# --- shared stores: lock expiry, several store objects -------------------------------------------


@shared_only
@pytest.mark.anyio
async def test_expired_lock_is_taken_over(backend: Backend) -> None:
    store = backend.make_short_locked(TTL / 2)
    await store.create("c1", lock_owner="dead worker")
    assert await store.try_lock("c1", "t2") is False
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    await backend.expire_locks()
    assert await store.try_lock("c1", "t2") is True
    await store.unlock("c1", "dead worker")  # the old owner can no longer release it
    assert await store.try_lock("c1", "t3") is False
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    await store.unlock("c1", "t2")
    assert await store.delete("c1") is True


@shared_only
@pytest.mark.anyio
async def test_conversation_with_expired_lock_expires(backend: Backend, clock: FakeClock) -> None:
    store = backend.make_short_locked(TTL * 10)
    await store.create("c1", lock_owner="dead worker")
    await store.create("c2")
    assert await store.try_lock("c2", "dead worker")
    clock.advance(TTL * 2)
    assert await store.count() == 2  # locked: kept past the TTL
    await backend.expire_locks()
    assert await store.info("c1") is None
    assert await store.count() == 0


@shared_only
@pytest.mark.anyio
async def test_expired_lock_does_not_block_eviction(backend: Backend) -> None:
    store = backend.make_short_locked(TTL / 2, max_conversations=1)
    await store.create("a", lock_owner="dead worker")
    with pytest.raises(ConversationLimitReached):
        await store.create("b")
    await backend.expire_locks()
    await store.create("b")
    assert await ids(store) == ["b"]


@shared_only
@pytest.mark.anyio
async def test_store_objects_on_one_database_share_everything(backend: Backend, clock: FakeClock) -> None:
    one, two = backend.make(max_conversations=2), backend.make(max_conversations=2)
    await one.create("c1", lock_owner="t1")
    assert await two.info("c1") == ConversationInfo("c1", clock.now, clock.now, 0)
    assert await two.try_lock("c1", "t2") is False
    with pytest.raises(ConversationBusy):
        await two.delete("c1")
    await one.append("c1", message("hi"))
    assert [m.content for m in await two.messages("c1")] == ["hi"]
    await two.unlock("c1", "t1")
    assert await one.try_lock("c1", "t2") is True
    clock.advance(1)
    await two.create("c2", lock_owner="t3")
    with pytest.raises(ValueError, match="c2"):
        await one.create("c2")
    with pytest.raises(ConversationLimitReached):  # the cap counts both objects' conversations
        await one.create("c3")
    await two.unlock("c2", "t3")
    await one.create("c3")
    assert (one.evicted, await two.info("c2")) == (1, None)


@shared_only
@pytest.mark.anyio
async def test_data_survives_reopening(backend: Backend, clock: FakeClock) -> None:
    store = backend.make()
    await store.create("c1", lock_owner="t1")
    await store.append("c1", message("kept"))
    await store.close()
    backend.stores.remove(store)
    reopened = backend.make()
    assert [m.content for m in await reopened.messages("c1")] == ["kept"]
    assert await reopened.try_lock("c1", "t2") is False
    assert await ids(reopened) == ["c1"]


@pytest.mark.anyio
@pytest.mark.parametrize("database", ["redis"], indirect=True)
async def test_redis_prefix_separates_deployments(backend: Backend) -> None:
    one, two = backend.make(prefix="one:"), backend.make(prefix="two:")
    await one.create("c1")
    assert await two.info("c1") is None
    await two.create("c1", lock_owner="t1")
    assert await one.delete("c1") is True
    assert await two.count() == 1


@pytest.mark.anyio
@pytest.mark.parametrize("database", ["redis"], indirect=True)
async def test_redis_keys_expire_as_a_backstop(
    backend: Backend, database: Database, clock: FakeClock
) -> None:
    store = backend.make(ttl=60, lock_ttl=30)
    assert isinstance(store, RedisStore)
    await store.create("c1", lock_owner="t1")
    sent = message('quote " and ünïcödé', "user")
    await store.append("c1", sent)
    client = redis.asyncio.Redis.from_url(database.url, decode_responses=True)
    try:
        for key in (store.key("meta", "c1"), store.key("messages", "c1"), "chatsse:active"):
            assert 80_000 < await client.pttl(key) <= 90_000, key
        assert 0 < await client.pttl(store.key("lock", "c1")) <= 30_000
        assert await client.get(store.key("lock", "c1")) == "t1"
        (stored,) = await client.lrange(store.key("messages", "c1"), 0, -1)
        assert stored == json.dumps(sent.to_dict(), separators=(",", ":"))  # compact JSON
        assert await client.zscore("chatsse:active", "c1") == clock.now
    finally:
        await client.aclose()


# --- SQLite specifics ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sqlite_file_is_wal_with_an_activity_index(tmp_path: Path, clock: FakeClock) -> None:
    store = SQLiteStore(tmp_path / "a" / "b" / "chat.db", ttl=TTL, max_conversations=5, max_messages=5)
    try:
        await store.create("c1")
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "a" / "b" / "chat.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert {"conversations", "messages", "conversations_by_activity"} <= names


@pytest.mark.anyio
async def test_sqlite_waits_for_another_writer_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, ttl=TTL, max_conversations=5, max_messages=5, busy_timeout=10)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
        task = asyncio.create_task(store.create("c1"))
        for _ in range(10):
            await asyncio.sleep(0.01)  # the loop keeps running meanwhile
        assert not task.done()
        other.execute("COMMIT")
        await task
        assert await store.count() == 1
    finally:
        other.close()
        await store.close()


@pytest.mark.anyio
async def test_sqlite_close_stops_its_thread(tmp_path: Path) -> None:
    def sqlite_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("chatsse-sqlite")}

    before = sqlite_threads()
    store = SQLiteStore(tmp_path / "chat.db", ttl=TTL, max_conversations=5, max_messages=5)
    await store.count()
    assert len(sqlite_threads() - before) == 1
    await store.close()
    await store.close()  # idempotent
    assert sqlite_threads() - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        await store.count()


def test_sqlite_bad_path_fails_at_construction(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises((sqlite3.Error, OSError)):
        SQLiteStore(tmp_path / "a-file" / "chat.db", ttl=TTL, max_conversations=5, max_messages=5)


@pytest.mark.parametrize("lock_ttl", [0, -1.0])
def test_lock_ttl_must_be_positive(lock_ttl: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lock_ttl"):
        SQLiteStore(tmp_path / "chat.db", ttl=TTL, max_conversations=5, max_messages=5, lock_ttl=lock_ttl)
    with pytest.raises(ValueError, match="lock_ttl"):
        RedisStore("redis://127.0.0.1:1/0", ttl=TTL, max_conversations=5, max_messages=5, lock_ttl=lock_ttl)
    assert not (tmp_path / "chat.db").exists()


# --- several processes on one database -----------------------------------------------------------

WORKERS = 4
TURNS = 25
CONVERSATIONS = 3
CAP = 5


async def _take_turns(url: str, capped_url: str, conversation_ids: list[str], worker: int) -> dict[str, int]:
    """``TURNS`` complete turns on the shared conversations (retrying while busy); inside each,
    a one-turn conversation in a second store capped at ``CAP`` conversations."""
    limits: dict[str, Any] = {"ttl": 3600, "max_messages": 1000, "lock_ttl": 10}
    store = open_store(url, max_conversations=100, **limits)
    capped = open_store(capped_url, max_conversations=CAP, **limits)
    assert isinstance(capped, SQLiteStore | RedisStore)
    try:
        manager = ConversationManager(store, max_history=6)
        capped_manager = ConversationManager(capped, max_history=6)
        busy = most = done = 0
        while done < TURNS:
            text = f"w{worker} t{done}"
            try:
                turn = await manager.begin_turn(conversation_ids[(worker + done) % CONVERSATIONS], text)
            except ConversationBusy:
                busy += 1
                await asyncio.sleep(0.001)
                continue
            assert turn.prompt[-1].content == text
            newest_first = [m.role for m in reversed(turn.prompt)]
            assert newest_first == [("user", "assistant")[i % 2] for i in range(len(newest_first))]
            fresh = await capped_manager.begin_turn(None, text)
            most = max(most, await capped.count())
            await capped_manager.finish_turn(fresh, f"reply to {text}", "stop")
            await manager.finish_turn(turn, f"reply to {text}", "stop")
            done += 1
        return {"busy": busy, "most": most, "evicted": capped.evicted}
    finally:
        await store.close()
        await capped.close()


def _worker(
    url: str, capped_url: str, conversation_ids: list[str], worker: int, start: Any, results: Any
) -> None:
    """A process's entry point: wait for every worker, then take turns; report a result or
    the traceback."""
    try:
        start.wait(timeout=60)
        results.put((worker, asyncio.run(_take_turns(url, capped_url, conversation_ids, worker))))
    except BaseException:
        results.put((worker, traceback.format_exc()))


@shared_only
def test_processes_never_corrupt_a_history_or_exceed_the_cap(database: Database) -> None:
    ctx = multiprocessing.get_context("spawn")
    conversation_ids = [f"shared{i}" for i in range(CONVERSATIONS)]

    async def create() -> None:
        store = open_store(database.url, ttl=3600, max_conversations=100, max_messages=1000, lock_ttl=60)
        for cid in conversation_ids:
            await store.create(cid)
        await store.close()

    asyncio.run(create())
    start, results = ctx.Barrier(WORKERS), ctx.Queue()
    processes = [
        ctx.Process(
            target=_worker, args=(database.url, database.other_url, conversation_ids, i, start, results)
        )
        for i in range(WORKERS)
    ]
    for process in processes:
        process.start()
    try:
        reports = dict(results.get(timeout=90) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
            process.close()
        results.close()
        results.join_thread()
    failures = [report for report in reports.values() if isinstance(report, str)]
    assert not failures, failures[0]

    async def check() -> None:
        store = open_store(database.url, ttl=3600, max_conversations=100, max_messages=1000, lock_ttl=60)
        capped = open_store(
            database.other_url, ttl=3600, max_conversations=CAP, max_messages=1000, lock_ttl=60
        )
        try:
            users: list[str] = []
            for cid in conversation_ids:
                history = await store.messages(cid)
                pairs = list(zip(history[::2], history[1::2], strict=True))
                for user, reply in pairs:
                    assert (user.role, reply.role) == ("user", "assistant")
                    assert reply.content == f"reply to {user.content}"
                users += [user.content for user, _ in pairs]
                info = await store.info(cid)
                assert info is not None
                assert info.message_count == len(history)
            assert sorted(users) == sorted(f"w{w} t{t}" for w in range(WORKERS) for t in range(TURNS))
            assert await capped.count() == CAP
            for info in await capped.list(CAP):
                assert [m.role for m in await capped.messages(info.id)] == ["user", "assistant"]
        finally:
            await store.close()
            await capped.close()

    asyncio.run(check())
    outcomes = [report for report in reports.values() if isinstance(report, dict)]
    assert sum(o["busy"] for o in outcomes) > 0  # the workers really did contend for turns
    assert max(o["most"] for o in outcomes) <= CAP
    assert sum(o["evicted"] for o in outcomes) == WORKERS * TURNS - CAP


# --- open_store ------------------------------------------------------------------------------------

LIMITS: dict[str, Any] = {"ttl": TTL, "max_conversations": 5, "max_messages": 5, "lock_ttl": 30}


@pytest.mark.anyio
async def test_open_memory_store() -> None:
    store = open_store("memory", **LIMITS)
    assert isinstance(store, MemoryStore)
    assert (store.name, store.ttl, store.max_conversations, store.max_messages) == ("memory", TTL, 5, 5)
    await store.close()


@pytest.mark.anyio
async def test_open_sqlite_store_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/chat.db", **LIMITS)
    try:
        assert isinstance(store, SQLiteStore)
        assert (store.name, store.path, store.lock_ttl, store.max_messages) == (
            "sqlite",
            "data/chat.db",
            30,
            5,
        )
        await store.create("c1")
    finally:
        await store.close()
    assert (tmp_path / "data" / "chat.db").is_file()


@pytest.mark.anyio
async def test_open_sqlite_store_absolute_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    assert url.startswith("sqlite:////")
    store = open_store(url, **LIMITS)
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(tmp_path / "chat.db")
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://user:pw@redis.example:6380/2"])
async def test_open_redis_store(url: str) -> None:
    store = open_store(url, **LIMITS)  # connects on first use, not here
    try:
        assert isinstance(store, RedisStore)
        assert (store.name, store.lock_ttl, store.max_conversations, store.prefix) == (
            "redis",
            30,
            5,
            "chatsse:",
        )
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "Memory",
        "memory://",
        "sqlite:///",
        "sqlite://chat.db",
        "sqlite:chat.db",
        "chat.db",
        "redis:/localhost",
        "postgres://localhost/chat",
    ],
)
def test_open_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="CHATSSE_STORE") as error:
        open_store(url, **LIMITS)
    text = str(error.value)
    for form in (
        "'memory'",
        "sqlite:///relative/path.db",
        "sqlite:////absolute/path.db",
        "redis://host:port/db",
    ):
        assert form in text
    assert f"(got {url!r})" in text


def test_open_store_error_hides_passwords() -> None:
    with pytest.raises(ValueError, match="CHATSSE_STORE") as error:
        open_store("redis+tls://user:hunter2@cache.internal:6379/0", **LIMITS)
    assert "hunter2" not in str(error.value)
    assert "user:***@cache.internal" in str(error.value)


def _open_fresh_files(paths: list[str], start: Any, results: Any) -> None:
    """A process's entry point: at the signal, open each new database file; report errors."""
    try:
        start.wait(timeout=60)
        for path in paths:
            store = SQLiteStore(path, ttl=60, max_conversations=10, max_messages=10)
            asyncio.run(store.close())
        results.put(None)
    except BaseException:
        results.put(traceback.format_exc())


def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    """Several workers starting at once on a file nobody has opened yet: switching it to WAL
    can meet "database is locked" at once, without the busy timeout; every open must succeed."""
    ctx = multiprocessing.get_context("fork")
    paths = [str(tmp_path / f"fresh-{i}.db") for i in range(40)]
    start, results = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_open_fresh_files, args=(paths, start, results)) for _ in range(8)]
    for process in processes:
        process.start()
    start.set()
    errors = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(10)
    assert [e for e in errors if e is not None] == []
