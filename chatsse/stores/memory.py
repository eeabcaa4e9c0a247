"""Conversations in one process's memory: ``CHATSSE_STORE=memory``."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

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

__all__ = ["MemoryStore"]

Clock = Callable[[], float]


@dataclass(slots=True)
class _Conversation:
    id: str
    owner: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)
    turn: str | None = None  # the token of the turn that holds, or last held, the lock
    lock_expires_at: float = 0.0

    def locked(self, now: float) -> bool:
        return self.turn is not None and self.lock_expires_at > now

    def info(self) -> ConversationInfo:
        return ConversationInfo(self.id, self.created_at, self.updated_at, len(self.messages))


class MemoryStore:
    """Conversations in a dict ordered by last activity. One process only: a second worker
    would hold conversations of its own (gunicorn.conf.py refuses that at start-up).

    Every call runs to its end without awaiting, so each is atomic in its event loop. Ties in
    the activity order (one clock reading) follow the order of the writes.
    """

    name = "memory"
    local = True

    def __init__(self, limits: StoreLimits, *, clock: Clock = time.time) -> None:
        self.limits = limits
        self.evicted = 0
        self._clock = clock
        self._items: OrderedDict[str, _Conversation] = OrderedDict()

    def _expire(self, now: float) -> None:
        """Drop idle conversations from the front of the activity order; one whose lock is
        held keeps its place and its life."""
        deadline = now - self.limits.ttl
        stale = []
        for conv in self._items.values():
            if conv.updated_at > deadline:
                break
            if not conv.locked(now):
                stale.append(conv.id)
        for conversation_id in stale:
            del self._items[conversation_id]

    def _live(self, conversation_id: str, owner: str | None = None) -> tuple[_Conversation | None, float]:
        """The live conversation, if there is one (and ``owner``, when given, owns it)."""
        now = self._clock()
        self._expire(now)
        conv = self._items.get(conversation_id)
        if conv is not None and owner is not None and conv.owner != owner:
            conv = None
        return conv, now

    def _touch(self, conv: _Conversation, now: float) -> None:
        conv.updated_at = now
        self._items.move_to_end(conv.id)

    def _add(self, conversation_id: str, owner: str, now: float) -> _Conversation:
        """A new conversation, evicting the least recently active unlocked one at the cap."""
        items = self._items
        if conversation_id in items:
            raise ValueError(f"conversation {conversation_id} exists")
        if len(items) >= self.limits.max_conversations:
            victim = next((c for c in items.values() if not c.locked(now)), None)
            if victim is None:
                raise _limit_reached(self.limits.max_conversations)
            del items[victim.id]
            self.evicted += 1
        conv = items[conversation_id] = _Conversation(conversation_id, owner, now, now)
        return conv

    async def begin_turn(
        self, conversation_id: str, user: Message, *, token: str, new: bool, history: int, owner: str = ""
    ) -> list[Message]:
        conv, now = self._live(conversation_id)
        if conv is not None and conv.owner != owner and not new:
            conv = None  # another owner's: not there
        max_messages = self.limits.max_messages
        if conv is not None and conv.turn == token:  # a retried call: the turn has begun
            return conv.messages[-history:]
        if new:
            if conv is not None:
                raise ValueError(f"conversation {conversation_id} exists")
            if _room_needed(False) > max_messages:
                raise _full(max_messages)
            conv = self._add(conversation_id, owner, now)
        elif conv is None:
            raise _not_found(conversation_id)
        elif conv.locked(now):
            raise _busy(conversation_id)
        else:
            orphaned = conv.turn
            if len(conv.messages) + _room_needed(orphaned is not None) > max_messages:
                raise _full(max_messages)
            if orphaned is not None:
                conv.messages.append(_lost_reply(orphaned, now))
        conv.messages.append(user)
        conv.turn, conv.lock_expires_at = token, now + self.limits.lock_ttl
        self._touch(conv, now)
        return conv.messages[-history:]

    async def finish_turn(self, conversation_id: str, reply: Message, *, token: str) -> None:
        conv, now = self._live(conversation_id)
        if conv is None or conv.turn != token:
            if conv is not None and conv.messages and conv.messages[-1].id == reply.id:
                return  # a retried call: the reply is stored
            raise _turn_lost(conversation_id)
        conv.messages.append(reply)
        conv.turn = None
        self._touch(conv, now)

    async def cancel_turn(self, conversation_id: str, *, token: str, user_message_id: str, new: bool) -> bool:
        conv, now = self._live(conversation_id)
        if conv is None or conv.turn != token:
            return False
        if conv.messages and conv.messages[-1].id == user_message_id:
            conv.messages.pop()
        conv.turn = None
        if new or conv.updated_at <= now - self.limits.ttl:
            del self._items[conversation_id]
        return True

    async def create(self, conversation_id: str, *, owner: str = "") -> ConversationInfo:
        now = self._clock()
        self._expire(now)
        return self._add(conversation_id, owner, now).info()

    async def info(self, conversation_id: str, *, owner: str = "") -> ConversationInfo | None:
        conv, _ = self._live(conversation_id, owner)
        return conv.info() if conv else None

    async def messages(
        self, conversation_id: str, last: int | None = None, *, owner: str = ""
    ) -> list[Message]:
        conv, _ = self._live(conversation_id, owner)
        if conv is None:
            raise _not_found(conversation_id)
        if last is None:
            return list(conv.messages)
        return conv.messages[-last:] if last > 0 else []

    async def delete(self, conversation_id: str, *, owner: str = "") -> bool:
        conv, now = self._live(conversation_id, owner)
        if conv is None:
            return False
        if conv.locked(now):
            raise _busy(conversation_id)
        del self._items[conversation_id]
        return True

    async def list(self, limit: int, *, owner: str = "") -> list[ConversationInfo]:
        self._expire(self._clock())
        out: list[ConversationInfo] = []
        for conv in reversed(self._items.values()):
            if len(out) >= limit:
                break
            if conv.owner == owner:
                out.append(conv.info())
        return out

    async def count(self, *, owner: str | None = None) -> int:
        self._expire(self._clock())
        if owner is None:
            return len(self._items)
        return sum(1 for conv in self._items.values() if conv.owner == owner)

    async def close(self) -> None:
        self._items.clear()
