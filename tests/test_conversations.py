"""chatsse.conversations: the manager's turns, its store deadlines and its background repairs.
The store policies are one shared suite run against every store: tests/test_stores.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import FakeClock

from chatsse.conversations import ConversationManager
from chatsse.errors import ConversationBusy, ConversationFull, ConversationNotFound, StorageUnavailable
from chatsse.models import Message
from chatsse.stores import StoreLimits
from chatsse.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_manager(
    clock: FakeClock, *, max_history: int = 20, timeout: float = 5, max_messages: int = 100, store: Any = None
) -> tuple[ConversationManager, MemoryStore]:
    store = store or MemoryStore(StoreLimits(60, 100, max_messages), clock=clock)
    return ConversationManager(store, max_history=max_history, timeout=timeout, clock=clock), store


class SlowStore(MemoryStore):
    """A MemoryStore whose turn calls take ``delay`` seconds (after doing their work, like a
    store whose answer is late), counting the calls."""

    local = False  # it waits: the manager's deadline applies

    def __init__(self, clock: FakeClock, delay: float) -> None:
        super().__init__(StoreLimits(60, 100, 100), clock=clock)
        self.delay = delay
        self.calls: list[str] = []

    async def begin_turn(self, *args: Any, **kwargs: Any) -> list[Message]:
        self.calls.append("begin")
        prompt = await super().begin_turn(*args, **kwargs)
        await asyncio.sleep(self.delay)
        return prompt

    async def finish_turn(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("finish")
        await asyncio.sleep(self.delay)
        await super().finish_turn(*args, **kwargs)

    async def cancel_turn(self, *args: Any, **kwargs: Any) -> bool:
        self.calls.append("cancel")
        return await super().cancel_turn(*args, **kwargs)


async def test_create_get_list_delete(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    first = await manager.create(owner="")
    clock.advance(1)
    second = await manager.create(owner="")
    assert first.id != second.id
    assert await manager.get(first.id, owner="") == first
    assert [i.id for i in await manager.list(owner="")] == [second.id, first.id]
    assert await manager.count(owner=None) == 2
    assert await manager.delete(first.id, owner="") is True
    assert await manager.get(first.id, owner="") is None
    assert await manager.count(owner=None) == 1


async def test_begin_turn_creates_a_conversation_locked_for_the_turn(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    turn = await manager.begin_turn(None, "hello there", owner="")
    assert turn.new is True
    user = turn.user_message
    assert (user.role, user.content, user.created_at, user.finish_reason) == (
        "user",
        "hello there",
        clock.now,
        None,
    )
    assert await manager.messages(turn.conversation_id, owner="") == [user]
    assert turn.prompt == [user]
    assert len({turn.reply_id, user.id, turn.token, turn.conversation_id}) == 4
    with pytest.raises(ConversationBusy):
        await manager.begin_turn(turn.conversation_id, "second", owner="")
    assert [m.content for m in await manager.messages(turn.conversation_id, owner="")] == ["hello there"]


async def test_begin_turn_on_an_unknown_conversation(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    with pytest.raises(ConversationNotFound):
        await manager.begin_turn("does-not-exist", "hi", owner="")
    assert await manager.count(owner=None) == 0


async def test_finish_turn_stores_the_reply_and_releases_the_lock(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    turn = await manager.begin_turn(None, "question", owner="")
    clock.advance(2)
    reply = await manager.finish_turn(turn, "an answer", "length")
    assert reply == Message(turn.reply_id, "assistant", "an answer", clock.now, "length")
    nxt = await manager.begin_turn(turn.conversation_id, "follow-up", owner="")
    assert nxt.prompt == [turn.user_message, reply, nxt.user_message]


async def test_a_full_new_conversation_is_not_kept(clock: FakeClock) -> None:
    manager, _ = make_manager(clock, max_messages=1)
    with pytest.raises(ConversationFull):
        await manager.begin_turn(None, "no room", owner="")
    assert await manager.count(owner=None) == 0


async def test_cancel_turn_removes_the_user_message(clock: FakeClock) -> None:
    manager, _ = make_manager(clock)
    info = await manager.create(owner="")
    turn = await manager.begin_turn(info.id, "never answered", owner="")
    await manager.cancel_turn(turn)
    assert await manager.messages(info.id, owner="") == []
    await manager.begin_turn(info.id, "unlocked again", owner="")


async def test_a_store_slower_than_the_deadline_is_storage_unavailable_and_the_turn_is_undone(
    clock: FakeClock,
) -> None:
    store = SlowStore(clock, delay=0.3)
    manager, _ = make_manager(clock, timeout=0.05, store=store)
    info = await manager.create(owner="")
    started = asyncio.get_running_loop().time()
    with pytest.raises(StorageUnavailable, match=r"did not begin the turn within 0\.05 s"):
        await manager.begin_turn(info.id, "late", owner="")
    assert asyncio.get_running_loop().time() - started < 0.25  # the deadline, not the store's pace
    # The store did begin the turn (its answer was late): the manager undoes it.
    await manager.settle(10)
    assert store.calls[:2] == ["begin", "cancel"]
    assert await store.messages(info.id) == []


async def test_a_finish_cancelled_mid_call_is_retried_in_the_background(clock: FakeClock) -> None:
    store = SlowStore(clock, delay=0.05)
    manager, _ = make_manager(clock, timeout=1, store=store)
    store.delay = 0
    turn = await manager.begin_turn(None, "q", owner="")
    store.delay = 0.05
    task = asyncio.ensure_future(manager.finish_turn(turn, "the reply the client saw", "stop"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await manager.settle(10)
    assert store.calls.count("finish") == 2
    assert [m.content for m in await store.messages(turn.conversation_id)] == [
        "q",
        "the reply the client saw",
    ]
