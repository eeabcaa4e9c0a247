"""Tests for chatsse.conversations: the ConversationManager's turns and what is particular
to MemoryStore. The store policies (TTL, cap, locks, room) are one shared suite run against
every store, MemoryStore included: tests/test_stores.py."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from support import FakeClock

from chatsse.conversations import (
    ConversationBusy,
    ConversationFull,
    ConversationManager,
    ConversationNotFound,
    MemoryStore,
    new_id,
)
from chatsse.models import Message, Role

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


async def test_messages_returns_a_copy(store: MemoryStore) -> None:
    await store.create("c1")
    await store.append("c1", message("one"))
    got = await store.messages("c1")
    got.append(message("not stored"))
    assert len(await store.messages("c1")) == 1


async def test_close_clears_everything(store: MemoryStore) -> None:
    await store.create("c1")
    await store.close()
    assert await store.count() == 0


# --- expiry ----------------------------------------------------------------------


async def test_try_lock_unknown_conversation(store: MemoryStore) -> None:
    with pytest.raises(ConversationNotFound):
        await store.try_lock("nope", "t1")


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


def test_new_ids_are_unique_random_hex_with_their_prefix() -> None:
    ids = [new_id("msg_") for _ in range(2000)]  # several 4 KiB blocks of random bytes
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"msg_[0-9a-f]{24}", i) for i in ids)


def test_a_forked_child_never_repeats_the_parents_ids() -> None:
    new_id()  # the parent holds a partly used block of random bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, " ".join(new_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child_ids = set(os.read(read, 4096).decode().split())
    os.close(read)
    os.waitpid(pid, 0)
    parent_ids = {new_id() for _ in range(3)}
    assert len(child_ids) == 3
    assert not child_ids & parent_ids
