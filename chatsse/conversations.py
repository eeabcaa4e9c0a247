"""Conversations: the storage interface, the in-memory store, and the manager routes use.

Policies (the README repeats them for users):

- Expiry: a conversation idle (no new message) for ``ttl`` seconds is gone; reads do not
  extend its life. A conversation with a turn in progress never expires mid-turn.
- Cap: at most ``max_conversations``. Creating one more evicts the least recently active
  conversation that has no turn in progress; if every one is busy, creation fails with
  :class:`ConversationLimitReached`.
- Length: at most ``max_messages`` messages per conversation; a turn that would exceed
  it fails with :class:`ConversationFull` before anything is stored.
- One turn at a time: a second turn on a conversation with a turn in progress fails with
  :class:`ConversationBusy` (HTTP 409) rather than queueing, so two clients never
  interleave replies in one history.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from chatsse.models import ConversationInfo, FinishReason, Message

Clock = Callable[[], float]


class ConversationError(Exception):
    """Base of the errors a turn can fail with before streaming starts."""

    type = "conversation_error"


class ConversationNotFound(ConversationError):
    type = "conversation_not_found"


class ConversationBusy(ConversationError):
    type = "conversation_busy"


class ConversationFull(ConversationError):
    type = "conversation_full"


class ConversationLimitReached(ConversationError):
    type = "conversation_limit"


class _RandomBlocks:
    """Bytes from ``os.urandom``, read 4 KiB at a time: one system call per 340 ids instead of
    one per id (a turn takes five). A forked child drops the block it inherited, so two
    workers never hand out the same bytes."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._block = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._block, self._pos = b"", 0

    def hex(self, n: int) -> str:
        with self._lock:
            pos = self._pos
            if pos + n > len(self._block):
                self._block, pos = os.urandom(self._size), 0
            self._pos = pos + n
            return self._block[pos : pos + n].hex()


_random = _RandomBlocks()


def new_id(prefix: str = "") -> str:
    """A unique, unguessable id: 96 random bits (a conversation id is all a client needs to
    read the conversation)."""
    return prefix + _random.hex(12)


class ConversationStore(Protocol):
    """Where conversations live. Each store enforces TTL, cap and turn locks itself."""

    name: str

    async def create(self, conversation_id: str, *, lock_owner: str | None = None) -> ConversationInfo:
        """Create an empty conversation (optionally locked for a first turn)."""
        ...

    async def info(self, conversation_id: str) -> ConversationInfo | None: ...

    async def messages(self, conversation_id: str, last: int | None = None) -> list[Message]:
        """All messages in order, or only the ``last`` ones."""
        ...

    async def append(self, conversation_id: str, message: Message, *, room_for: int = 1) -> None:
        """Add a message if ``room_for`` messages (this one included) still fit; raises
        :class:`ConversationNotFound` or :class:`ConversationFull`."""
        ...

    async def delete(self, conversation_id: str) -> bool:
        """Delete; raises :class:`ConversationBusy` while a turn is in progress."""
        ...

    async def list(self, limit: int) -> list[ConversationInfo]:
        """Most recently active first."""
        ...

    async def count(self) -> int: ...

    async def try_lock(self, conversation_id: str, owner: str) -> bool:
        """Take the conversation's turn lock; False if another turn holds it."""
        ...

    async def unlock(self, conversation_id: str, owner: str) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Conversation:
    id: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)
    lock_owner: str | None = None

    def info(self) -> ConversationInfo:
        return ConversationInfo(self.id, self.created_at, self.updated_at, len(self.messages))


class MemoryStore:
    """Conversations in a dict ordered by last activity. One process only."""

    name = "memory"

    def __init__(
        self,
        *,
        ttl: float,
        max_conversations: int,
        max_messages: int,
        clock: Clock = time.time,
    ) -> None:
        self.ttl = ttl
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self.evicted = 0
        self._clock = clock
        self._items: OrderedDict[str, _Conversation] = OrderedDict()

    def _expire(self, now: float) -> None:
        """Drop idle conversations from the front of the activity order.

        A conversation mid-turn is skipped (moved to the back, its time unchanged); it is
        dropped when its turn releases the lock without storing anything new."""
        deadline = now - self.ttl
        items = self._items
        for _ in range(len(items)):
            oldest = next(iter(items.values()))
            if oldest.updated_at > deadline:
                return
            if oldest.lock_owner is not None:
                items.move_to_end(oldest.id)
            else:
                del items[oldest.id]

    def _touch(self, conv: _Conversation, now: float) -> None:
        conv.updated_at = now
        self._items.move_to_end(conv.id)

    def _live(self, conversation_id: str) -> _Conversation | None:
        self._expire(self._clock())
        return self._items.get(conversation_id)

    async def create(self, conversation_id: str, *, lock_owner: str | None = None) -> ConversationInfo:
        now = self._clock()
        self._expire(now)
        if conversation_id in self._items:
            raise ValueError(f"conversation {conversation_id} exists")
        if len(self._items) >= self.max_conversations:
            victim = next((c for c in self._items.values() if c.lock_owner is None), None)
            if victim is None:
                raise ConversationLimitReached(
                    f"all {self.max_conversations} conversations have a turn in progress"
                )
            del self._items[victim.id]
            self.evicted += 1
        conv = _Conversation(conversation_id, now, now, lock_owner=lock_owner)
        self._items[conversation_id] = conv
        return conv.info()

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        conv = self._live(conversation_id)
        return conv.info() if conv else None

    async def messages(self, conversation_id: str, last: int | None = None) -> list[Message]:
        conv = self._live(conversation_id)
        if conv is None:
            raise ConversationNotFound(f"no conversation {conversation_id}")
        if last is None:
            return list(conv.messages)
        return conv.messages[-last:] if last > 0 else []

    async def append(self, conversation_id: str, message: Message, *, room_for: int = 1) -> None:
        conv = self._live(conversation_id)
        if conv is None:
            raise ConversationNotFound(f"no conversation {conversation_id}")
        if len(conv.messages) + room_for > self.max_messages:
            raise ConversationFull(f"conversation holds the maximum of {self.max_messages} messages")
        conv.messages.append(message)
        self._touch(conv, self._clock())

    async def delete(self, conversation_id: str) -> bool:
        conv = self._live(conversation_id)
        if conv is None:
            return False
        if conv.lock_owner is not None:
            raise ConversationBusy("a turn is in progress")
        del self._items[conversation_id]
        return True

    async def list(self, limit: int) -> list[ConversationInfo]:
        self._expire(self._clock())
        out: list[ConversationInfo] = []
        for conv in reversed(self._items.values()):
            if len(out) >= limit:
                break
            out.append(conv.info())
        return out

    async def count(self) -> int:
        self._expire(self._clock())
        return len(self._items)

    async def try_lock(self, conversation_id: str, owner: str) -> bool:
        conv = self._live(conversation_id)
        if conv is None:
            raise ConversationNotFound(f"no conversation {conversation_id}")
        if conv.lock_owner is not None:
            return False
        conv.lock_owner = owner
        return True

    async def unlock(self, conversation_id: str, owner: str) -> None:
        conv = self._items.get(conversation_id)
        if conv is not None and conv.lock_owner == owner:
            conv.lock_owner = None
            if conv.updated_at <= self._clock() - self.ttl:
                del self._items[conversation_id]

    async def close(self) -> None:
        self._items.clear()


@dataclass(slots=True)
class Turn:
    """A user message accepted into a conversation, awaiting its reply."""

    conversation_id: str
    user_message: Message
    reply_id: str
    prompt: list[Message]
    created_conversation: bool
    lock_owner: str


class ConversationManager:
    """Conversation operations for the routes: turns, trimming, reads."""

    def __init__(self, store: ConversationStore, *, max_history: int, clock: Clock = time.time) -> None:
        self.store = store
        self.max_history = max_history
        self._clock = clock

    async def create(self) -> ConversationInfo:
        return await self.store.create(new_id())

    async def get(self, conversation_id: str) -> ConversationInfo | None:
        return await self.store.info(conversation_id)

    async def messages(self, conversation_id: str, limit: int | None = None) -> list[Message]:
        return await self.store.messages(conversation_id, limit)

    async def list(self, limit: int = 100) -> list[ConversationInfo]:
        return await self.store.list(limit)

    async def delete(self, conversation_id: str) -> bool:
        return await self.store.delete(conversation_id)

    async def count(self) -> int:
        return await self.store.count()

    async def begin_turn(self, conversation_id: str | None, text: str) -> Turn:
        """Lock the conversation (creating it if ``conversation_id`` is None) and store the
        user's message. The caller must call :meth:`finish_turn` exactly once."""
        owner = new_id("turn_")
        created = conversation_id is None
        if conversation_id is None:
            conversation_id = new_id()
            await self.store.create(conversation_id, lock_owner=owner)
        elif not await self.store.try_lock(conversation_id, owner):
            raise ConversationBusy(f"conversation {conversation_id} has a turn in progress")
        try:
            user = Message(new_id("msg_"), "user", text, self._clock())
            await self.store.append(conversation_id, user, room_for=2)  # and its reply
            prompt = await self.store.messages(conversation_id, self.max_history)
        except BaseException:
            await self.store.unlock(conversation_id, owner)
            if created:
                await self.store.delete(conversation_id)
            raise
        return Turn(conversation_id, user, new_id("msg_"), prompt, created, owner)

    async def finish_turn(self, turn: Turn, content: str, finish_reason: FinishReason) -> Message:
        """Store the assistant's reply (complete or partial) and release the turn lock."""
        reply = Message(turn.reply_id, "assistant", content, self._clock(), finish_reason)
        try:
            await self.store.append(turn.conversation_id, reply)
        finally:
            await self.store.unlock(turn.conversation_id, turn.lock_owner)
        return reply
