"""Tests for chatsse.conversations: MemoryStore policies (with a fake clock) and the
ConversationManager's turns."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
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
from chatsse.models import ConversationInfo, Message, Role

pytestmark = pytest.mark.anyio

TTL = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_store(
    clock: FakeClock, *, ttl: float = TTL, max_conversations: int = 100, max_messages: int = 100
) -> MemoryStore:
    return MemoryStore(ttl=ttl, max_conversations=max_conversations, max_messages=max_messages, clock=clock)


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return make_store(clock)


_counter = iter(range(10**9))


def message(content: str, role: Role = "user") -> Message:
    return Message(f"msg{next(_counter)}", role, content, 0.0)


async def ids(store: MemoryStore, limit: int = 1000) -> list[str]:
    return [info.id for info in await store.list(limit)]


# --- MemoryStore basics ----------------------------------------------------------


async def test_create_and_info(store: MemoryStore, clock: FakeClock) -> None:
    created = await store.create("c1")
    assert created == ConversationInfo("c1", clock.now, clock.now, 0)
    assert await store.info("c1") == created
    assert await store.info("nope") is None
    assert await store.count() == 1


async def test_create_existing_id_is_refused(store: MemoryStore) -> None:
    await store.create("c1")
    with pytest.raises(ValueError, match="c1"):
        await store.create("c1")
    assert await store.count() == 1


async def test_append_and_messages_in_order(store: MemoryStore, clock: FakeClock) -> None:
    await store.create("c1")
    sent = [message("one"), message("two", "assistant"), message("three")]
    for i, m in enumerate(sent):
        clock.advance(1)
        await store.append("c1", m)
        info = await store.info("c1")
        assert info is not None
        assert info.message_count == i + 1
        assert info.updated_at == clock.now
    assert await store.messages("c1") == sent
    info = await store.info("c1")
    assert info is not None
    assert info.created_at == clock.now - 3


async def test_messages_returns_a_copy(store: MemoryStore) -> None:
    await store.create("c1")
    await store.append("c1", message("one"))
    got = await store.messages("c1")
    got.append(message("not stored"))
    assert len(await store.messages("c1")) == 1


@pytest.mark.parametrize("last", [1, 2, 4, 5, 9])
async def test_messages_last_n(store: MemoryStore, last: int) -> None:
    await store.create("c1")
    sent = [message(str(i)) for i in range(5)]
    for m in sent:
        await store.append("c1", m)
    assert await store.messages("c1", last=last) == sent[-last:]
    assert await store.messages("c1", last=None) == sent


async def test_unknown_conversation_messages_and_append_raise(store: MemoryStore) -> None:
    with pytest.raises(ConversationNotFound):
        await store.messages("nope")
    with pytest.raises(ConversationNotFound):
        await store.append("nope", message("x"))
    assert await store.count() == 0


async def test_delete(store: MemoryStore) -> None:
    await store.create("c1")
    await store.create("c2")
    assert await store.delete("c1") is True
    assert await store.info("c1") is None
    assert await store.count() == 1
    assert await store.delete("c1") is False
    assert await store.delete("never") is False
    assert await ids(store) == ["c2"]


async def test_list_is_most_recent_activity_first(store: MemoryStore, clock: FakeClock) -> None:
    for cid in ("a", "b", "c"):
        await store.create(cid)
        clock.advance(1)
    assert await ids(store) == ["c", "b", "a"]
    await store.append("a", message("hi"))
    assert await ids(store) == ["a", "c", "b"]
    infos = await store.list(100)
    assert [i.updated_at for i in infos] == sorted((i.updated_at for i in infos), reverse=True)
    assert await ids(store, limit=2) == ["a", "c"]
    assert await ids(store, limit=0) == []


async def test_count(store: MemoryStore) -> None:
    assert await store.count() == 0
    for i in range(4):
        await store.create(f"c{i}")
    assert await store.count() == 4


async def test_close_clears_everything(store: MemoryStore) -> None:
    await store.create("c1")
    await store.close()
    assert await store.count() == 0


# --- expiry ----------------------------------------------------------------------


async def test_idle_conversation_expires_after_ttl(store: MemoryStore, clock: FakeClock) -> None:
    await store.create("old")
    clock.advance(TTL / 2)
    await store.create("young")
    clock.advance(TTL / 2 - 1)
    assert await store.info("old") is not None
    assert await store.count() == 2
    clock.advance(2)
    assert await store.info("old") is None
    assert await store.count() == 1
    assert await ids(store) == ["young"]
    with pytest.raises(ConversationNotFound):
        await store.messages("old")
    with pytest.raises(ConversationNotFound):
        await store.append("old", message("too late"))


async def test_reads_do_not_extend_life(store: MemoryStore, clock: FakeClock) -> None:
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


async def test_appends_extend_life(store: MemoryStore, clock: FakeClock) -> None:
    await store.create("c1")
    clock.advance(TTL - 1)
    await store.append("c1", message("still here"))
    clock.advance(TTL - 1)
    assert await store.info("c1") is not None
    clock.advance(2)
    assert await store.info("c1") is None


async def test_locked_conversation_does_not_expire(store: MemoryStore, clock: FakeClock) -> None:
    await store.create("turning", lock_owner="t1")
    await store.create("idle")
    await store.try_lock("idle", "t2")
    clock.advance(TTL * 3)
    assert await store.info("turning") is not None
    assert await store.info("idle") is not None
    assert await store.count() == 2
    await store.unlock("turning", "t1")
    await store.unlock("idle", "t2")
    clock.advance(TTL + 1)
    assert await store.count() == 0


# --- the cap -----------------------------------------------------------------------


async def test_cap_evicts_least_recently_active(clock: FakeClock) -> None:
    store = make_store(clock, max_conversations=3)
    for cid in ("a", "b", "c"):
        await store.create(cid)
        clock.advance(1)
    await store.append("a", message("keeps a alive"))
    clock.advance(1)
    await store.create("d")
    assert store.evicted == 1
    assert await store.count() == 3
    assert await store.info("b") is None
    assert sorted(await ids(store)) == ["a", "c", "d"]
    await store.create("e")
    assert store.evicted == 2
    assert await store.info("c") is None


async def test_cap_skips_locked_conversations(clock: FakeClock) -> None:
    store = make_store(clock, max_conversations=3)
    await store.create("a", lock_owner="turn")
    clock.advance(1)
    await store.create("b")
    clock.advance(1)
    await store.create("c")
    clock.advance(1)
    await store.create("d")
    assert store.evicted == 1
    assert await store.info("a") is not None
    assert await store.info("b") is None


async def test_cap_reached_with_every_conversation_locked(clock: FakeClock) -> None:
    store = make_store(clock, max_conversations=2)
    await store.create("a", lock_owner="t1")
    await store.create("b")
    assert await store.try_lock("b", "t2")
    with pytest.raises(ConversationLimitReached):
        await store.create("c")
    assert store.evicted == 0
    assert await store.count() == 2
    assert await store.info("c") is None
    await store.unlock("b", "t2")
    await store.create("c")
    assert await store.info("b") is None
    assert store.evicted == 1


async def test_expired_conversations_are_not_counted_as_evicted(clock: FakeClock) -> None:
    store = make_store(clock, max_conversations=2)
    await store.create("a")
    await store.create("b")
    clock.advance(TTL + 1)
    await store.create("c")
    assert store.evicted == 0
    assert await ids(store) == ["c"]


# --- message limit, locks ------------------------------------------------------------


async def test_max_messages_refuses_append(clock: FakeClock) -> None:
    store = make_store(clock, max_messages=2)
    await store.create("c1")
    await store.append("c1", message("one"))
    await store.append("c1", message("two", "assistant"))
    with pytest.raises(ConversationFull):
        await store.append("c1", message("three"))
    assert [m.content for m in await store.messages("c1")] == ["one", "two"]


async def test_delete_of_locked_conversation_is_busy(store: MemoryStore) -> None:
    await store.create("c1", lock_owner="t1")
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    assert await store.info("c1") is not None
    await store.unlock("c1", "t1")
    assert await store.delete("c1") is True


async def test_try_lock_twice(store: MemoryStore) -> None:
    await store.create("c1")
    assert await store.try_lock("c1", "t1") is True
    assert await store.try_lock("c1", "t2") is False
    assert await store.try_lock("c1", "t1") is False  # not re-entrant either
    await store.unlock("c1", "t1")
    assert await store.try_lock("c1", "t2") is True


async def test_try_lock_unknown_conversation(store: MemoryStore) -> None:
    with pytest.raises(ConversationNotFound):
        await store.try_lock("nope", "t1")


async def test_unlock_by_non_owner_does_nothing(store: MemoryStore) -> None:
    await store.create("c1")
    assert await store.try_lock("c1", "owner")
    await store.unlock("c1", "intruder")
    assert await store.try_lock("c1", "other") is False
    with pytest.raises(ConversationBusy):
        await store.delete("c1")
    await store.unlock("c1", "owner")
    assert await store.try_lock("c1", "other") is True


async def test_unlock_unknown_conversation_is_harmless(store: MemoryStore) -> None:
    await store.unlock("nope", "t1")
    assert await store.count() == 0


# --- ConversationManager ---------------------------------------------------------------


def make_manager(
    clock: FakeClock, *, max_history: int = 20, **store_options: Any
) -> tuple[ConversationManager, MemoryStore]:
    store = make_store(clock, **store_options)
    return ConversationManager(store, max_history=max_history, clock=clock), store


async def test_manager_create_get_list_delete(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    first = await manager.create()
    clock.advance(1)
    second = await manager.create()
    assert first.id != second.id
    assert await manager.get(first.id) == first
    assert [i.id for i in await manager.list()] == [second.id, first.id]
    assert await manager.count() == 2
    assert await manager.delete(first.id) is True
    assert await manager.get(first.id) is None
    assert await manager.count() == 1


async def test_begin_turn_creates_a_conversation(clock: FakeClock) -> None:
    manager, store = make_manager(clock)
    turn = await manager.begin_turn(None, "hello there")
    assert turn.created_conversation is True
    assert await manager.count() == 1
    user = turn.user_message
    assert (user.role, user.content, user.created_at, user.finish_reason) == (
        "user",
        "hello there",
        clock.now,
        None,
    )
    assert await manager.messages(turn.conversation_id) == [user]
    assert turn.prompt == [user]
    assert turn.reply_id != user.id
    # The conversation is locked for the turn.
    assert await store.try_lock(turn.conversation_id, "someone else") is False


async def test_begin_turn_on_unknown_conversation(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    with pytest.raises(ConversationNotFound):
        await manager.begin_turn("does-not-exist", "hi")
    assert await manager.count() == 0


async def test_begin_turn_on_busy_conversation_stores_nothing(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    turn = await manager.begin_turn(None, "first")
    with pytest.raises(ConversationBusy):
        await manager.begin_turn(turn.conversation_id, "second")
    assert [m.content for m in await manager.messages(turn.conversation_id)] == ["first"]


async def test_finish_turn_stores_reply_and_releases_lock(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    turn = await manager.begin_turn(None, "question")
    clock.advance(2)
    reply = await manager.finish_turn(turn, "an answer", "length")
    assert reply == Message(turn.reply_id, "assistant", "an answer", clock.now, "length")
    assert await manager.messages(turn.conversation_id) == [turn.user_message, reply]

    nxt = await manager.begin_turn(turn.conversation_id, "follow-up")
    assert nxt.created_conversation is False
    assert nxt.prompt == [turn.user_message, reply, nxt.user_message]
    await manager.finish_turn(nxt, "", "interrupted")
    assert await manager.delete(turn.conversation_id) is True


async def test_prompt_is_trimmed_to_max_history(clock: FakeClock) -> None:
    manager, _ = make_manager(clock, max_history=3)
    turn = await manager.begin_turn(None, "u0")
    conv = turn.conversation_id
    await manager.finish_turn(turn, "a0", "stop")
    for i in range(1, 4):
        turn = await manager.begin_turn(conv, f"u{i}")
        stored = await manager.messages(conv)
        assert turn.prompt == stored[-3:]
        assert turn.prompt[-1] == turn.user_message
        await manager.finish_turn(turn, f"a{i}", "stop")
    assert [m.content for m in turn.prompt] == ["u2", "a2", "u3"]
    assert len(await manager.messages(conv)) == 8


async def test_manager_messages_limit(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    turn = await manager.begin_turn(None, "q")
    await manager.finish_turn(turn, "a", "stop")
    assert [m.content for m in await manager.messages(turn.conversation_id, 1)] == ["a"]
    assert [m.content for m in await manager.messages(turn.conversation_id)] == ["q", "a"]


async def test_full_new_conversation_is_deleted_and_unlocked(clock: FakeClock) -> None:
    manager, _ = make_manager(clock, max_messages=0)
    with pytest.raises(ConversationFull):
        await manager.begin_turn(None, "no room")
    assert await manager.count() == 0


async def test_full_existing_conversation_is_kept_and_unlocked(clock: FakeClock) -> None:
    manager, store = make_manager(clock, max_messages=0)
    info = await manager.create()
    with pytest.raises(ConversationFull):
        await manager.begin_turn(info.id, "no room")
    assert await manager.get(info.id) is not None
    assert await store.try_lock(info.id, "next turn") is True


async def test_turn_without_room_for_its_reply_fails_before_storing(clock: FakeClock) -> None:
    # Policy: "a turn that would exceed [max_messages] fails with ConversationFull before
    # anything is stored". A turn stores two messages (user + reply); with 2 of 3 used,
    # the reply cannot fit, so the turn must be refused up front.
    manager, _ = make_manager(clock, max_messages=3)
    turn = await manager.begin_turn(None, "q1")
    await manager.finish_turn(turn, "a1", "stop")
    with pytest.raises(ConversationFull):
        await manager.begin_turn(turn.conversation_id, "q2")
    assert [m.content for m in await manager.messages(turn.conversation_id)] == ["q1", "a1"]


async def test_refused_turn_does_not_extend_conversation_life(clock: FakeClock) -> None:
    # Policy: a conversation idle (no new message) for ttl seconds is gone. A turn that
    # is refused stores no message, so it must not keep the conversation alive.
    manager, _ = make_manager(clock, max_messages=2)
    turn = await manager.begin_turn(None, "q1")
    await manager.finish_turn(turn, "a1", "stop")
    clock.advance(TTL - 10)
    with pytest.raises(ConversationFull):
        await manager.begin_turn(turn.conversation_id, "q2")
    clock.advance(20)  # TTL + 10 since the last message
    assert await manager.get(turn.conversation_id) is None


async def test_finish_turn_releases_lock_when_storing_fails(clock: FakeClock) -> None:
    class FailingAppend(MemoryStore):
        async def append(self, conversation_id: str, message: Message, *, room_for: int = 1) -> None:
            if message.role == "assistant":
                raise RuntimeError("disk on fire")
            await super().append(conversation_id, message, room_for=room_for)

    store = FailingAppend(ttl=TTL, max_conversations=10, max_messages=10, clock=clock)
    manager = ConversationManager(store, max_history=10, clock=clock)
    turn = await manager.begin_turn(None, "q")
    with pytest.raises(RuntimeError, match="disk on fire"):
        await manager.finish_turn(turn, "a", "stop")
    assert await store.try_lock(turn.conversation_id, "next") is True


class YieldingStore(MemoryStore):
    """A MemoryStore that yields to the event loop before every operation, so concurrent
    turns really interleave (as they would with a networked store)."""

    async def try_lock(self, conversation_id: str, owner: str) -> bool:
        await asyncio.sleep(0)
        return await super().try_lock(conversation_id, owner)

    async def append(self, conversation_id: str, message: Message, *, room_for: int = 1) -> None:
        await asyncio.sleep(0)
        await super().append(conversation_id, message, room_for=room_for)

    async def messages(self, conversation_id: str, last: int | None = None) -> list[Message]:
        await asyncio.sleep(0)
        return await super().messages(conversation_id, last)


@pytest.mark.parametrize("store_class", [MemoryStore, YieldingStore])
async def test_concurrent_turns_on_one_conversation(clock: FakeClock, store_class: type[MemoryStore]) -> None:
    store = store_class(ttl=TTL, max_conversations=10, max_messages=10, clock=clock)
    manager = ConversationManager(store, max_history=10, clock=clock)
    info = await manager.create()
    results = await asyncio.gather(
        manager.begin_turn(info.id, "from client A"),
        manager.begin_turn(info.id, "from client B"),
        return_exceptions=True,
    )
    turns = [r for r in results if isinstance(r, Turn)]
    errors = [r for r in results if not isinstance(r, Turn)]
    assert len(turns) == 1
    assert len(errors) == 1
    assert isinstance(errors[0], ConversationBusy)
    stored = await manager.messages(info.id)
    assert stored == [turns[0].user_message]
    await manager.finish_turn(turns[0], "reply", "stop")
    assert len(await manager.messages(info.id)) == 2
