"""One behaviour suite for every conversation store: MemoryStore, SQLiteStore (a file in
tmp_path) and RedisStore (a real redis-server, flushed before each test), all on a fake
clock; then what only shared stores do (several store objects and several processes on one
database), and open_store.

Lock expiry: MemoryStore's and SQLiteStore's run on the store's clock (the fake one here);
RedisStore's is Redis's own PX expiry, on Redis's clock, so its tests use a 0.5 s lock and
really wait.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis_server import MISSING, redis_server, redis_server_binary
from support import FakeClock

from chatsse.conversations import ConversationManager, Turn
from chatsse.errors import (
    ConversationBusy,
    ConversationFull,
    ConversationLimitReached,
    ConversationNotFound,
    StorageUnavailable,
    TurnLost,
)
from chatsse.models import ConversationInfo, FinishReason, Message, Role
from chatsse.stores import StoreLimits, open_store
from chatsse.stores.memory import MemoryStore
from chatsse.stores.redis import RedisStore
from chatsse.stores.sqlite import SQLiteStore

TTL = 60.0
KINDS = ["memory", "sqlite", "redis"]
SHARED = ["sqlite", "redis"]
# How long a lock lives in the lock-expiry tests on Redis (real seconds).
REDIS_LOCK_TTL = 0.5
HISTORY = 100

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
        lock_ttl: float = 600.0,
        prefix: str = "chatsse:",
    ) -> Store:
        limits = StoreLimits(ttl, max_conversations, max_messages, lock_ttl)
        store: Store
        if self.kind == "memory":
            store = MemoryStore(limits, clock=self.clock)
        elif self.kind == "sqlite":
            store = SQLiteStore(self.database.url.removeprefix("sqlite:///"), limits, clock=self.clock)
        else:
            store = RedisStore(self.database.url, limits, prefix=prefix, clock=self.clock)
        self.stores.append(store)
        return store

    def make_short_locked(self, lock_ttl: float, **limits: Any) -> Store:
        """A store whose locks expire soon: after ``lock_ttl`` fake seconds (memory, SQLite),
        after ``REDIS_LOCK_TTL`` real seconds (Redis)."""
        self.short_lock_ttl = REDIS_LOCK_TTL if self.kind == "redis" else lock_ttl
        return self.make(lock_ttl=self.short_lock_ttl, **limits)

    async def expire_locks(self) -> None:
        """Let the locks of a :meth:`make_short_locked` store expire."""
        if self.kind == "redis":
            await asyncio.sleep(self.short_lock_ttl * 1.5)
        else:
            self.clock.advance(self.short_lock_ttl)


@pytest.fixture
async def backend(database: Database, clock: FakeClock) -> AsyncIterator[Backend]:
    made = Backend(database, clock)
    yield made
    for store in made.stores:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.make()


_counter = iter(range(10**9))


def message(content: str, role: Role = "user", finish_reason: FinishReason | None = None) -> Message:
    return Message(f"msg{next(_counter)}", role, content, 0.0, finish_reason)


def reply(content: str, finish_reason: FinishReason = "stop") -> Message:
    return message(content, "assistant", finish_reason)


async def begin(
    store: Store, cid: str, text: str, token: str, *, new: bool = False, history: int = HISTORY
) -> list[Message]:
    return await store.begin_turn(cid, message(text), token=token, new=new, history=history)


async def turn(store: Store, cid: str, text: str, *, new: bool = False) -> list[Message]:
    """One whole turn: the user's ``text`` and the reply ``re: text``."""
    token = f"t{next(_counter)}"
    await begin(store, cid, text, token, new=new)
    await store.finish_turn(cid, reply(f"re: {text}"), token=token)
    return await store.messages(cid)


async def contents(store: Store, cid: str) -> list[str]:
    return [m.content for m in await store.messages(cid)]


async def ids(store: Store, limit: int = 1000) -> list[str]:
    return [info.id for info in await store.list(limit)]


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
    with pytest.raises(ValueError, match="c1"):
        await begin(store, "c1", "hi", "t1", new=True)
    assert await store.count() == 1
    assert await store.messages("c1") == []


@pytest.mark.anyio
async def test_turns_store_messages_in_order(store: Store, clock: FakeClock) -> None:
    created = clock.now
    await store.create("c1")
    sent: list[Message] = []
    for i in range(3):
        clock.advance(1)
        user, answer = message(f"q{i}"), reply(f"a{i}", "length")
        prompt = await store.begin_turn("c1", user, token=f"t{i}", new=False, history=HISTORY)
        assert prompt == [*sent, user]
        assert await store.info("c1") == ConversationInfo("c1", created, clock.now, 2 * i + 1)
        clock.advance(1)
        await store.finish_turn("c1", answer, token=f"t{i}")
        sent += [user, answer]
        assert await store.info("c1") == ConversationInfo("c1", created, clock.now, 2 * i + 2)
    assert await store.messages("c1") == sent


@pytest.mark.anyio
@pytest.mark.parametrize("last", [-1, 0, 1, 2, 5, 9])
async def test_messages_last_n(store: Store, last: int) -> None:
    await store.create("c1")
    for i in range(2):
        await turn(store, "c1", str(i))
    sent = await store.messages("c1")
    assert len(sent) == 4
    assert await store.messages("c1", last=last) == (sent[-last:] if last > 0 else [])
    assert await store.messages("c1", last=None) == sent


@pytest.mark.anyio
async def test_messages_round_trip_exactly(store: Store) -> None:
    contents_ = ["", "\x00", "a\r\nb\n\n", "\u2028 \ufeff ünïcödé 🚀", '{"json": [1, "x"]}', "x" * 20_000]
    times = [0.0, 1e-9, 1_795_767_861.123456, 1 / 3, 10**12 + 0.5, 7.0]
    reasons: list[FinishReason] = ["stop", "length", "interrupted", "timeout", "error", "shutdown"]
    await store.create("c1")
    sent = []
    for i, (text, created) in enumerate(zip(contents_, times, strict=True)):
        user = Message(f"u-{i}", "user", text, created)
        answer = Message(f"a-{i}", "assistant", text[::-1], created + 1, reasons[i])
        await store.begin_turn("c1", user, token=f"t{i}", new=False, history=HISTORY)
        await store.finish_turn("c1", answer, token=f"t{i}")
        sent += [user, answer]
    assert await store.messages("c1") == sent


@pytest.mark.anyio
async def test_unknown_conversation(store: Store) -> None:
    assert await store.info("nope") is None
    with pytest.raises(ConversationNotFound):
        await store.messages("nope")
    with pytest.raises(ConversationNotFound):
        await store.messages("nope", last=0)
    with pytest.raises(ConversationNotFound):
        await begin(store, "nope", "x", "t1")
    with pytest.raises(TurnLost):
        await store.finish_turn("nope", reply("x"), token="t1")
    assert await store.cancel_turn("nope", token="t1", user_message_id="m", new=False) is False
    assert await store.delete("nope") is False
    assert await store.count() == 0


@pytest.mark.anyio
async def test_delete(store: Store) -> None:
    await turn(store, "c1", "hi", new=True)
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
    await turn(store, "a", "hi")
    assert await ids(store) == ["a", "c", "b"]
    infos = await store.list(100)
    assert infos[0] == ConversationInfo("a", clock.now - 3, clock.now, 2)
    assert await ids(store, limit=2) == ["a", "c"]
    assert await ids(store, limit=0) == []
    assert await ids(store, limit=-1) == []


@pytest.mark.anyio
async def test_count(store: Store) -> None:
    assert await store.count() == 0
    for i in range(4):
        await store.create(f"c{i}")
    assert await store.count() == 4


# --- owners --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_another_owners_conversation_is_not_there(store: Store) -> None:
    await store.begin_turn("c1", message("mine"), token="t1", new=True, history=HISTORY, owner="alice")
    await store.finish_turn("c1", reply("re: mine"), token="t1")
    assert await store.info("c1", owner="bob") is None
    assert await store.info("c1", owner="") is None
    with pytest.raises(ConversationNotFound):
        await store.messages("c1", owner="bob")
    with pytest.raises(ConversationNotFound):  # continuing it is refused as for a missing one
        await store.begin_turn("c1", message("theirs"), token="t2", new=False, history=HISTORY, owner="bob")
    assert await store.delete("c1", owner="bob") is False
    # Nothing of bob's calls changed alice's conversation.
    assert [m.content for m in await store.messages("c1", owner="alice")] == ["mine", "re: mine"]
    info = await store.info("c1", owner="alice")
    assert info is not None
    assert info.message_count == 2
    assert await store.delete("c1", owner="alice") is True


@pytest.mark.anyio
async def test_list_and_count_see_the_owners_own(store: Store, clock: FakeClock) -> None:
    for cid, owner in [("a1", "alice"), ("b1", "bob"), ("a2", "alice"), ("n1", "")]:
        await store.create(cid, owner=owner)
        clock.advance(1)
    await store.begin_turn("a1", message("newest"), token="t", new=False, history=HISTORY, owner="alice")
    assert [i.id for i in await store.list(10, owner="alice")] == ["a1", "a2"]
    assert [i.id for i in await store.list(10, owner="bob")] == ["b1"]
    assert [i.id for i in await store.list(10)] == ["n1"]
    assert [i.id for i in await store.list(1, owner="alice")] == ["a1"]
    assert await store.count(owner="alice") == 2
    assert await store.count(owner="carol") == 0
    assert await store.count() == 4
    await store.delete("a2", owner="alice")
    assert await store.count(owner="alice") == 1
    assert [i.id for i in await store.list(10, owner="alice")] == ["a1"]


@pytest.mark.anyio
async def test_an_expired_conversation_leaves_its_owners_list(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(ttl=10)
    await store.create("a1", owner="alice")
    clock.advance(5)
    await store.create("a2", owner="alice")
    clock.advance(6)
    assert [i.id for i in await store.list(10, owner="alice")] == ["a2"]
    assert await store.count(owner="alice") == 1


# --- turns ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_new_conversations_first_turn(store: Store, clock: FakeClock) -> None:
    user = message("hello")
    prompt = await store.begin_turn("c1", user, token="t1", new=True, history=HISTORY)
    assert prompt == [user]
    assert await store.info("c1") == ConversationInfo("c1", clock.now, clock.now, 1)
    with pytest.raises(ConversationBusy):  # locked for its turn
        await begin(store, "c1", "too early", "t2")
    answer = reply("hi there")
    await store.finish_turn("c1", answer, token="t1")
    assert await store.messages("c1") == [user, answer]
    assert [m.content for m in await begin(store, "c1", "next", "t2")] == ["hello", "hi there", "next"]


@pytest.mark.anyio
async def test_a_busy_conversation_refuses_a_turn_and_stores_nothing(store: Store, clock: FakeClock) -> None:
    await begin(store, "c1", "first", "t1", new=True)
    updated = clock.now
    clock.advance(1)
    for token in ("t2", "t3"):
        with pytest.raises(ConversationBusy):
            await begin(store, "c1", "second", token)
    info = await store.info("c1")
    assert info is not None
    assert (info.message_count, info.updated_at) == (1, updated)
    assert await contents(store, "c1") == ["first"]


@pytest.mark.anyio
async def test_prompt_is_the_last_history_messages(store: Store) -> None:
    await store.create("c1")
    for i in range(3):
        await turn(store, "c1", f"u{i}")
    prompt = await begin(store, "c1", "u3", "t9", history=3)
    assert [m.content for m in prompt] == ["re: u1", "u2", "re: u2", "u3"][-3:]
    assert prompt[-1].content == "u3"
    assert len(await store.messages("c1")) == 7


@pytest.mark.anyio
async def test_begin_and_finish_are_idempotent_for_one_token(store: Store) -> None:
    user = message("q")
    first = await store.begin_turn("c1", user, token="t1", new=True, history=HISTORY)
    again = await store.begin_turn("c1", user, token="t1", new=True, history=HISTORY)  # a retried call
    assert first == again == [user]
    answer = reply("a")
    await store.finish_turn("c1", answer, token="t1")
    await store.finish_turn("c1", answer, token="t1")  # a retried call
    assert await store.messages("c1") == [user, answer]


@pytest.mark.anyio
async def test_finish_with_another_token_is_refused(store: Store) -> None:
    await begin(store, "c1", "q", "t1", new=True)
    with pytest.raises(TurnLost):
        await store.finish_turn("c1", reply("not mine"), token="intruder")
    assert await contents(store, "c1") == ["q"]
    with pytest.raises(ConversationBusy):  # the lock is still t1's
        await store.delete("c1")
    await store.finish_turn("c1", reply("mine"), token="t1")
    assert await contents(store, "c1") == ["q", "mine"]


@pytest.mark.anyio
async def test_cancel_turn_undoes_the_begin(store: Store) -> None:
    await turn(store, "c1", "one", new=True)
    user = message("two")
    await store.begin_turn("c1", user, token="t2", new=False, history=HISTORY)
    assert await store.cancel_turn("c1", token="intruder", user_message_id=user.id, new=False) is False
    assert await store.cancel_turn("c1", token="t2", user_message_id=user.id, new=False) is True
    assert await contents(store, "c1") == ["one", "re: one"]
    assert await store.cancel_turn("c1", token="t2", user_message_id=user.id, new=False) is False
    with pytest.raises(TurnLost):  # the cancelled turn can no longer store a reply
        await store.finish_turn("c1", reply("late"), token="t2")
    await turn(store, "c1", "three")  # unlocked
    assert await store.count() == 1


@pytest.mark.anyio
async def test_cancel_turn_deletes_the_conversation_it_created(store: Store) -> None:
    user = message("hello")
    await store.begin_turn("c1", user, token="t1", new=True, history=HISTORY)
    assert await store.cancel_turn("c1", token="t1", user_message_id=user.id, new=True) is True
    assert await store.info("c1") is None
    assert await store.count() == 0


# --- message limit ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_turn_without_room_for_its_reply_is_refused_before_storing(
    backend: Backend, clock: FakeClock
) -> None:
    store = backend.make(max_messages=3)
    await turn(store, "c1", "q1", new=True)
    updated = clock.now
    clock.advance(1)
    with pytest.raises(ConversationFull):
        await begin(store, "c1", "q2", "t2")
    info = await store.info("c1")
    assert info is not None
    assert (info.message_count, info.updated_at) == (2, updated)  # a refusal stores nothing
    assert await contents(store, "c1") == ["q1", "re: q1"]
    assert await store.delete("c1") is True  # and the refusal left no lock behind


@pytest.mark.anyio
async def test_a_new_conversation_without_room_is_not_created(backend: Backend) -> None:
    store = backend.make(max_messages=1)
    with pytest.raises(ConversationFull):
        await begin(store, "c1", "no room for the reply", "t1", new=True)
    assert await store.count() == 0


@pytest.mark.anyio
async def test_a_refused_turn_does_not_extend_life(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_messages=2)
    await turn(store, "c1", "q1", new=True)
    clock.advance(TTL - 10)
    with pytest.raises(ConversationFull):
        await begin(store, "c1", "q2", "t2")
    clock.advance(10)
    assert await store.info("c1") is None


# --- expiry ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_idle_conversation_expires_after_ttl(store: Store, clock: FakeClock) -> None:
    await turn(store, "old", "hi", new=True)
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
        await begin(store, "old", "too late", "t9")
    assert await store.delete("old") is False
    await store.create("old")  # the id is free again
    assert await store.messages("old") == []


@pytest.mark.anyio
async def test_reads_do_not_extend_life(store: Store, clock: FakeClock) -> None:
    await turn(store, "c1", "hi", new=True)
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
async def test_turns_extend_life(store: Store, clock: FakeClock) -> None:
    await store.create("c1")
    clock.advance(TTL - 1)
    await turn(store, "c1", "still here")
    clock.advance(TTL - 1)
    assert await store.info("c1") is not None
    clock.advance(2)
    assert await store.info("c1") is None


@pytest.mark.anyio
async def test_a_conversation_mid_turn_does_not_expire(store: Store, clock: FakeClock) -> None:
    await begin(store, "turning", "q", "t1", new=True)
    clock.advance(TTL * 3)
    await store.create("new")  # a write, which sweeps expired conversations
    assert await store.info("turning") is not None
    assert await store.count() == 2
    await store.finish_turn("turning", reply("a"), token="t1")  # the reply: alive again
    clock.advance(TTL - 1)
    assert await contents(store, "turning") == ["q", "a"]
    clock.advance(1)
    assert await store.count() == 0


@pytest.mark.anyio
async def test_a_stale_turn_cancelled_deletes_its_conversation(store: Store, clock: FakeClock) -> None:
    await store.create("c1")
    user = message("q")
    await store.begin_turn("c1", user, token="t1", new=False, history=HISTORY)
    clock.advance(TTL + 1)
    assert await store.cancel_turn("c1", token="t1", user_message_id=user.id, new=False) is True
    assert await store.info("c1") is None
    assert await store.count() == 0


@pytest.mark.anyio
async def test_a_conversation_mid_turn_keeps_its_place_in_the_activity_order(
    store: Store, clock: FakeClock
) -> None:
    await begin(store, "a", "q", "t1", new=True)
    clock.advance(TTL - 1)
    await store.create("b")
    clock.advance(2)  # a is past its TTL but mid-turn; b is fresh
    await store.create("c")
    assert await ids(store) == ["c", "b", "a"]
    clock.advance(1)
    await store.finish_turn("a", reply("r"), token="t1")
    assert await ids(store) == ["a", "c", "b"]


# --- the cap -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cap_evicts_least_recently_active(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=3)
    for cid in ("a", "b", "c"):
        await store.create(cid)
        clock.advance(1)
    await turn(store, "a", "keeps a alive")
    clock.advance(1)
    await store.create("d")
    assert store.evicted == 1
    assert await store.count() == 3
    assert await store.info("b") is None
    assert await ids(store) == ["d", "a", "c"]
    await begin(store, "e", "a new one evicts too", "t1", new=True)
    assert store.evicted == 2
    assert await store.info("c") is None


@pytest.mark.anyio
async def test_cap_skips_conversations_mid_turn(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=3)
    await begin(store, "a", "q", "t1", new=True)
    clock.advance(1)
    await store.create("b")
    clock.advance(1)
    await store.create("c")
    await begin(store, "c", "q", "t2")
    clock.advance(1)
    await store.create("d")
    assert store.evicted == 1
    assert await store.info("a") is not None
    assert await store.info("b") is None
    assert sorted(await ids(store)) == ["a", "c", "d"]


@pytest.mark.anyio
async def test_cap_reached_with_every_conversation_mid_turn(backend: Backend) -> None:
    store = backend.make(max_conversations=2)
    await begin(store, "a", "q", "t1", new=True)
    await begin(store, "b", "q", "t2", new=True)
    with pytest.raises(ConversationLimitReached):
        await store.create("c")
    with pytest.raises(ConversationLimitReached):
        await begin(store, "c", "q", "t3", new=True)
    assert store.evicted == 0
    assert await store.count() == 2
    assert await store.info("c") is None
    await store.finish_turn("b", reply("r"), token="t2")
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


# --- locks: held, expired, taken over -----------------------------------------------------------


@pytest.mark.anyio
async def test_delete_of_a_conversation_mid_turn_is_busy(store: Store) -> None:
    await begin(store, "c1", "q", "t1", new=True)
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    assert await store.info("c1") is not None
    await store.finish_turn("c1", reply("r"), token="t1")
    assert await store.delete("c1") is True


@pytest.mark.anyio
async def test_an_expired_lock_is_taken_over_and_the_old_turn_is_refused(backend: Backend) -> None:
    store = backend.make_short_locked(TTL / 2)
    await begin(store, "c1", "from a worker that died", "dead", new=True)
    with pytest.raises(ConversationBusy):
        await begin(store, "c1", "too early", "t2")
    await backend.expire_locks()
    prompt = await begin(store, "c1", "after the takeover", "t2")
    # The dead turn's reply is recorded as lost: the history still alternates.
    assert [(m.role, m.content, m.finish_reason) for m in prompt] == [
        ("user", "from a worker that died", None),
        ("assistant", "", "lost"),
        ("user", "after the takeover", None),
    ]
    assert prompt[1].id == "lost_dead"
    with pytest.raises(TurnLost):  # the old turn comes back: its reply is refused
        await store.finish_turn("c1", reply("late reply"), token="dead")
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    await store.finish_turn("c1", reply("the new reply"), token="t2")
    assert await contents(store, "c1") == [
        "from a worker that died",
        "",
        "after the takeover",
        "the new reply",
    ]
    assert await store.delete("c1") is True


@pytest.mark.anyio
async def test_a_turn_that_outlived_its_lock_unchallenged_stores_its_reply(backend: Backend) -> None:
    store = backend.make_short_locked(TTL / 2)
    await begin(store, "c1", "slow", "t1", new=True)
    await backend.expire_locks()
    await store.finish_turn("c1", reply("still mine"), token="t1")
    assert await contents(store, "c1") == ["slow", "still mine"]
    await turn(store, "c1", "next")
    assert len(await store.messages("c1")) == 4  # no lost reply: the turn ended


@pytest.mark.anyio
async def test_a_takeover_needs_room_for_the_lost_reply(backend: Backend) -> None:
    store = backend.make_short_locked(TTL / 2, max_messages=4)
    await turn(store, "c1", "one", new=True)
    await begin(store, "c1", "dead turn", "dead")
    await backend.expire_locks()
    with pytest.raises(ConversationFull):  # 3 stored + lost reply + user + reply > 4
        await begin(store, "c1", "no room", "t2")
    assert await contents(store, "c1") == ["one", "re: one", "dead turn"]


@pytest.mark.anyio
async def test_a_conversation_with_an_expired_lock_expires(backend: Backend, clock: FakeClock) -> None:
    store = backend.make_short_locked(TTL * 10)
    await begin(store, "c1", "q", "dead", new=True)
    await begin(store, "c2", "q", "dead too", new=True)
    clock.advance(TTL * 2)
    assert await store.count() == 2  # locked: kept past the TTL
    await backend.expire_locks()
    assert await store.info("c1") is None
    assert await store.count() == 0


@pytest.mark.anyio
async def test_an_expired_lock_does_not_block_eviction(backend: Backend) -> None:
    store = backend.make_short_locked(TTL / 2, max_conversations=1)
    await begin(store, "a", "q", "dead", new=True)
    with pytest.raises(ConversationLimitReached):
        await store.create("b")
    await backend.expire_locks()
    await store.create("b")
    assert await ids(store) == ["b"]


# --- the manager on each store ------------------------------------------------------------------


def manager_on(store: Store, clock: FakeClock, max_history: int = 20) -> ConversationManager:
    return ConversationManager(store, max_history=max_history, timeout=5, clock=clock)


@pytest.mark.anyio
async def test_manager_turns(store: Store, clock: FakeClock) -> None:
    manager = manager_on(store, clock)
    first = await manager.begin_turn(None, "question", owner="")
    assert first.new is True
    assert first.prompt == [first.user_message]
    clock.advance(2)
    answer = await manager.finish_turn(first, "an answer", "length")
    assert answer == Message(first.reply_id, "assistant", "an answer", clock.now, "length")
    assert await manager.messages(first.conversation_id, owner="") == [first.user_message, answer]

    nxt = await manager.begin_turn(first.conversation_id, "follow-up", owner="")
    assert nxt.new is False
    assert nxt.prompt == [first.user_message, answer, nxt.user_message]
    with pytest.raises(ConversationBusy):
        await manager.begin_turn(first.conversation_id, "too early", owner="")
    await manager.finish_turn(nxt, "", "interrupted")
    assert [m.content for m in await manager.messages(first.conversation_id, 1, owner="")] == [""]
    assert await manager.delete(first.conversation_id, owner="") is True
    assert await manager.count(owner=None) == 0


@pytest.mark.anyio
async def test_manager_prompt_is_trimmed_to_max_history(store: Store, clock: FakeClock) -> None:
    manager = manager_on(store, clock, max_history=3)
    first = await manager.begin_turn(None, "u0", owner="")
    conv = first.conversation_id
    await manager.finish_turn(first, "a0", "stop")
    for i in range(1, 4):
        nxt = await manager.begin_turn(conv, f"u{i}", owner="")
        assert nxt.prompt == (await manager.messages(conv, owner=""))[-3:]
        await manager.finish_turn(nxt, f"a{i}", "stop")
    assert [m.content for m in nxt.prompt] == ["u2", "a2", "u3"]
    assert len(await manager.messages(conv, owner="")) == 8


@pytest.mark.anyio
@pytest.mark.parametrize("clients", [2, 8])
async def test_concurrent_turns_on_one_conversation(store: Store, clock: FakeClock, clients: int) -> None:
    manager = manager_on(store, clock)
    info = await manager.create(owner="")
    results = await asyncio.gather(
        *(manager.begin_turn(info.id, f"from client {i}", owner="") for i in range(clients)),
        return_exceptions=True,
    )
    turns = [r for r in results if isinstance(r, Turn)]
    assert len(turns) == 1
    assert all(isinstance(r, ConversationBusy) for r in results if r is not turns[0])
    assert await manager.messages(info.id, owner="") == [turns[0].user_message]
    await manager.finish_turn(turns[0], "reply", "stop")
    assert len(await manager.messages(info.id, owner="")) == 2


@pytest.mark.anyio
async def test_concurrent_new_conversations_respect_the_cap(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(max_conversations=5)
    manager = manager_on(store, clock)
    results = await asyncio.gather(
        *(manager.begin_turn(None, f"hello {i}", owner="") for i in range(20)), return_exceptions=True
    )
    turns = [r for r in results if isinstance(r, Turn)]
    assert len(turns) == 5  # every conversation is mid-turn: nothing can be evicted
    assert sum(isinstance(r, ConversationLimitReached) for r in results) == 15
    assert await store.count() == 5
    for begun in turns:
        await manager.finish_turn(begun, "reply", "stop")
    await manager.begin_turn(None, "one more", owner="")
    assert (await store.count(), store.evicted) == (5, 1)


# --- shared stores: several store objects ----------------------------------------------------------

shared_only = pytest.mark.parametrize("database", SHARED, indirect=True)


@shared_only
@pytest.mark.anyio
async def test_store_objects_on_one_database_share_everything(backend: Backend, clock: FakeClock) -> None:
    one, two = backend.make(max_conversations=2), backend.make(max_conversations=2)
    await begin(one, "c1", "hi", "t1", new=True)
    assert await two.info("c1") == ConversationInfo("c1", clock.now, clock.now, 1)
    with pytest.raises(ConversationBusy):
        await begin(two, "c1", "interleave?", "t2")
    with pytest.raises(ConversationBusy):
        await two.delete("c1")
    await two.finish_turn("c1", reply("answered by another worker"), token="t1")
    assert await contents(one, "c1") == ["hi", "answered by another worker"]
    clock.advance(1)
    await begin(two, "c2", "q", "t3", new=True)
    with pytest.raises(ValueError, match="c2"):
        await one.create("c2")
    await begin(one, "c3", "q", "t4", new=True)  # the cap counts both objects' conversations
    assert (one.evicted, await two.info("c1")) == (1, None)
    with pytest.raises(ConversationLimitReached):  # c2 and c3 are both mid-turn
        await two.create("c4")
    await one.finish_turn("c2", reply("r"), token="t3")
    await two.create("c4")
    assert (two.evicted, await one.info("c2")) == (1, None)


@shared_only
@pytest.mark.anyio
async def test_data_survives_reopening(backend: Backend) -> None:
    store = backend.make()
    await turn(store, "c1", "kept", new=True)
    await begin(store, "c1", "mid-turn", "t1")
    await store.close()
    backend.stores.remove(store)
    reopened = backend.make()
    assert await contents(reopened, "c1") == ["kept", "re: kept", "mid-turn"]
    with pytest.raises(ConversationBusy):
        await begin(reopened, "c1", "q", "t2")
    await reopened.finish_turn("c1", reply("after reopening"), token="t1")
    assert await ids(reopened) == ["c1"]


@pytest.mark.anyio
@pytest.mark.parametrize("database", ["redis"], indirect=True)
async def test_redis_prefix_separates_deployments(backend: Backend) -> None:
    one, two = backend.make(prefix="one:"), backend.make(prefix="two:")
    await one.create("c1")
    assert await two.info("c1") is None
    await begin(two, "c1", "q", "t1", new=True)
    assert await one.delete("c1") is True
    assert await two.count() == 1


@pytest.mark.anyio
@pytest.mark.parametrize("database", ["redis"], indirect=True)
async def test_redis_keys_expire_as_a_backstop(
    backend: Backend, database: Database, clock: FakeClock
) -> None:
    store = backend.make(ttl=60, lock_ttl=30)
    assert isinstance(store, RedisStore)
    sent = message('quote " and ünïcödé', "user")
    await store.begin_turn("c1", sent, token="t1", new=True, history=HISTORY)
    client = redis.asyncio.Redis.from_url(database.url, decode_responses=True)
    try:
        for key in (store.key("meta", "c1"), store.key("messages", "c1"), "chatsse:active"):
            assert 80_000 < await client.pttl(key) <= 90_000, key
        assert 0 < await client.pttl(store.key("lock", "c1")) <= 30_000
        assert await client.get(store.key("lock", "c1")) == "t1"
        assert await client.hget(store.key("meta", "c1"), "turn") == "t1"
        (stored,) = await client.lrange(store.key("messages", "c1"), 0, -1)
        assert stored == json.dumps(sent.to_dict(), separators=(",", ":"))  # compact JSON
        assert await client.zscore("chatsse:active", "c1") == clock.now
        await store.finish_turn("c1", reply("r"), token="t1")
        assert await client.exists(store.key("lock", "c1")) == 0
        assert await client.hget(store.key("meta", "c1"), "turn") is None
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_redis_that_is_not_there_is_storage_unavailable() -> None:
    from chatsse.processes import free_port

    limits = StoreLimits(TTL, 5, 5, 30)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", limits, timeout=1)
    try:
        with pytest.raises(StorageUnavailable, match="Redis"):
            await store.count()
    finally:
        await store.close()


def test_limits_must_be_positive() -> None:
    for bad in ({"ttl": 0}, {"lock_ttl": -1.0}, {"max_conversations": 0}, {"max_messages": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StoreLimits(**{"ttl": TTL, "max_conversations": 5, "max_messages": 5, "lock_ttl": 30, **bad})


# --- SQLite specifics ---------------------------------------------------------------------------

LIMITS = StoreLimits(TTL, 5, 5, 30)


@pytest.mark.anyio
async def test_sqlite_file_is_wal_with_an_activity_index(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "a" / "b" / "chat.db", LIMITS)
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
async def test_sqlite_file_from_before_owners_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " message_count INTEGER NOT NULL DEFAULT 0, lock_owner TEXT, lock_expires_at REAL);"
        "INSERT INTO conversations VALUES ('old', 1e12, 1e12, 0, NULL, NULL);"
    )
    conn.close()
    store = SQLiteStore(path, LIMITS)
    try:  # the old conversation is the anonymous owner's, and new ones get owners
        assert [i.id for i in await store.list(10)] == ["old"]
        assert await store.info("old", owner="alice") is None
        await store.create("new", owner="alice")
        assert [i.id for i in await store.list(10, owner="alice")] == ["new"]
    finally:
        await store.close()


@pytest.mark.anyio
async def test_sqlite_waits_for_another_writer_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, LIMITS, timeout=10)
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
async def test_sqlite_locked_longer_than_its_timeout_is_storage_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, LIMITS, timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageUnavailable, match="locked"):
            await begin(store, "c1", "q", "t1", new=True)
        other.execute("ROLLBACK")
        assert await store.count() == 0
        await begin(store, "c1", "q", "t1", new=True)  # free again
    finally:
        other.close()
        await store.close()


@pytest.mark.anyio
async def test_sqlite_close_stops_its_threads(tmp_path: Path) -> None:
    def sqlite_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("chatsse-sqlite")}

    before = sqlite_threads()
    store = SQLiteStore(tmp_path / "chat.db", LIMITS)
    await store.count()  # a read: the reader's thread
    assert len(sqlite_threads() - before) == 2
    await store.close()
    await store.close()  # idempotent
    assert sqlite_threads() - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        await store.count()


@pytest.mark.anyio
async def test_sqlite_reads_answer_while_a_write_waits_for_another_processs_lock(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, LIMITS, timeout=5.0)
    try:
        await store.create("c1")
        other = sqlite3.connect(path, isolation_level=None)  # another process's write lock
        other.execute("BEGIN IMMEDIATE")
        try:
            user = Message("u-1", "user", "hi", 0.0)
            write = asyncio.ensure_future(store.begin_turn("c1", user, token="t", new=False, history=10))
            await asyncio.sleep(0.1)  # the write is waiting on the lock, on the writer's thread
            assert await store.count() == 1  # a read is not queued behind it
            assert [info.id for info in await store.list(10)] == ["c1"]
            assert not write.done()
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert [m.id for m in await write] == ["u-1"]  # and the write goes through once it can
    finally:
        await store.close()


def test_sqlite_bad_path_fails_at_construction(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises((sqlite3.Error, OSError)):
        SQLiteStore(tmp_path / "a-file" / "chat.db", LIMITS)


@pytest.mark.anyio
async def test_sqlite_count_uses_the_activity_index(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db", LIMITS)
    await store.close()
    conn = sqlite3.connect(tmp_path / "chat.db")
    try:
        for condition in (
            "updated_at > 1",
            "updated_at <= 1 AND lock_owner IS NOT NULL AND lock_expires_at > 1",
        ):
            plan = " ".join(
                row[-1]
                for row in conn.execute(
                    f"EXPLAIN QUERY PLAN SELECT COUNT(*) FROM conversations WHERE {condition}"
                )
            )
            assert "conversations_by_activity" in plan, plan
            assert "SCAN conversations" not in plan.replace("USING COVERING INDEX", ""), plan
    finally:
        conn.close()


# --- several processes on one database -----------------------------------------------------------

WORKERS = 4
TURNS = 25
CONVERSATIONS = 3
CAP = 5


async def _take_turns(url: str, capped_url: str, conversation_ids: list[str], worker: int) -> dict[str, int]:
    """``TURNS`` complete turns on the shared conversations (retrying while busy); inside each,
    a one-turn conversation in a second store capped at ``CAP`` conversations."""
    store = open_store(url, StoreLimits(3600, 100, 1000, 10), timeout=10)
    capped = open_store(capped_url, StoreLimits(3600, CAP, 1000, 10), timeout=10)
    assert isinstance(capped, SQLiteStore | RedisStore)
    try:
        manager = ConversationManager(store, max_history=6, timeout=10)
        capped_manager = ConversationManager(capped, max_history=6, timeout=10)
        busy = most = done = 0
        while done < TURNS:
            text = f"w{worker} t{done}"
            try:
                begun = await manager.begin_turn(
                    conversation_ids[(worker + done) % CONVERSATIONS], text, owner=""
                )
            except ConversationBusy:
                busy += 1
                await asyncio.sleep(0.001)
                continue
            assert begun.prompt[-1].content == text
            newest_first = [m.role for m in reversed(begun.prompt)]
            assert newest_first == [("user", "assistant")[i % 2] for i in range(len(newest_first))]
            fresh = await capped_manager.begin_turn(None, text, owner="")
            most = max(most, await capped.count())
            await capped_manager.finish_turn(fresh, f"reply to {text}", "stop")
            await manager.finish_turn(begun, f"reply to {text}", "stop")
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
    limits = StoreLimits(3600, 100, 1000, 60)

    async def create() -> None:
        store = open_store(database.url, limits, timeout=10)
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
        store = open_store(database.url, limits, timeout=10)
        capped = open_store(database.other_url, StoreLimits(3600, CAP, 1000, 60), timeout=10)
        try:
            users: list[str] = []
            for cid in conversation_ids:
                history = await store.messages(cid)
                pairs = list(zip(history[::2], history[1::2], strict=True))
                for user, answer in pairs:
                    assert (user.role, answer.role) == ("user", "assistant")
                    assert answer.content == f"reply to {user.content}"
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


def _open_fresh_files(paths: list[str], start: Any, results: Any) -> None:
    """A process's entry point: at the signal, open each new database file; report errors."""
    try:
        start.wait(timeout=60)
        for path in paths:
            store = SQLiteStore(path, StoreLimits(60, 10, 10))
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
