"""The conversation store interface: two atomic calls per turn, plus reads and management.

Every store keeps the same policies (README, "Conversations"; one test suite,
tests/test_stores.py, runs against each):

- Turns. ``begin_turn`` takes the conversation's turn lock for the caller's ``token``, stores
  the user's message and returns the trimmed prompt; ``finish_turn`` stores the reply only if
  ``token`` still holds the turn, and releases the lock. Each is one atomic step of the store
  (one SQLite transaction, one Redis script), so two workers never interleave a history.
  Both are idempotent for one ``token``: a retried call after a lost answer does no harm.
- The token is a fence. A lock expires ``lock_ttl`` seconds after it was taken (a worker that
  died mid-turn must not lock its conversation forever); the store remembers which token held
  it last. A turn that begins on a conversation whose previous turn never stored its reply
  first stores that reply as ``""`` with finish reason ``lost``, so a history always
  alternates user and assistant; the old turn's ``finish_turn`` is then refused
  (:class:`~chatsse.errors.TurnLost`).
- Expiry: a conversation with no new message for ``ttl`` seconds is gone; reads do not
  extend its life; a conversation whose lock is held never expires.
- Cap: at most ``max_conversations``; creating one more evicts the least recently active
  conversation whose lock is not held, or fails with ``ConversationLimitReached``.
- Length: at most ``max_messages`` per conversation; ``begin_turn`` keeps room for the reply
  (and a ``lost`` one) and refuses with ``ConversationFull`` before storing anything.
- Owners: a conversation belongs to the ``owner`` that created it (an API key's id;
  ``""``, the one caller of a server without keys). Every call that names a conversation
  names the caller's owner too, and another owner's conversation is reported exactly as one
  that does not exist; ``list`` and ``count`` see the owner's own (``count(owner=None)``:
  all of them). The turn token fences ``finish_turn`` and ``cancel_turn`` on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from chatsse.errors import (
    ConversationBusy,
    ConversationFull,
    ConversationLimitReached,
    ConversationNotFound,
    TurnLost,
)
from chatsse.models import ConversationInfo, Message

__all__ = ["ConversationStore", "StoreLimits"]


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """The bounds every store enforces (from settings, chatsse/deadlines.py for ``lock_ttl``)."""

    ttl: float
    max_conversations: int
    max_messages: int
    lock_ttl: float = 600.0

    def __post_init__(self) -> None:
        for name in ("ttl", "lock_ttl"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)!r})")
        for name in ("max_conversations", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)!r})")


class ConversationStore(Protocol):
    """Where conversations live (see the module docstring for the policies)."""

    name: str
    limits: StoreLimits
    evicted: int  # conversations this store object evicted to make room
    local: bool  # True when no call ever waits on I/O (so none can outlast a deadline)

    async def begin_turn(
        self, conversation_id: str, user: Message, *, token: str, new: bool, history: int, owner: str = ""
    ) -> list[Message]:
        """Take the turn lock for ``token`` (creating the conversation when ``new``), store
        ``user`` and return the last ``history`` messages, ``user`` last."""
        ...

    async def finish_turn(self, conversation_id: str, reply: Message, *, token: str) -> None:
        """Store ``reply`` and release the lock if ``token`` still holds the turn; else raise
        :class:`~chatsse.errors.TurnLost`."""
        ...

    async def cancel_turn(self, conversation_id: str, *, token: str, user_message_id: str, new: bool) -> bool:
        """Undo a ``begin_turn`` whose caller cannot go on: if ``token`` still holds the turn,
        remove its user message and release the lock (delete the conversation if the turn
        created it). False if there was nothing to undo."""
        ...

    async def create(self, conversation_id: str, *, owner: str = "") -> ConversationInfo:
        """An empty conversation; ValueError if the id exists."""
        ...

    async def info(self, conversation_id: str, *, owner: str = "") -> ConversationInfo | None: ...

    async def messages(
        self, conversation_id: str, last: int | None = None, *, owner: str = ""
    ) -> list[Message]:
        """All messages in order, or only the ``last`` ones."""
        ...

    async def delete(self, conversation_id: str, *, owner: str = "") -> bool:
        """Delete; raises ``ConversationBusy`` while a turn holds the lock."""
        ...

    async def list(self, limit: int, *, owner: str = "") -> list[ConversationInfo]:
        """The owner's conversations, most recently active first."""
        ...

    async def count(self, *, owner: str | None = None) -> int:
        """The owner's conversations (None: every owner's)."""
        ...

    async def close(self) -> None: ...


def _lost_reply_id(token: str) -> str:
    """The id of the ``lost`` reply stored for the turn ``token`` (each store makes the same)."""
    return f"lost_{token}"


def _lost_reply(token: str, now: float) -> Message:
    return Message(_lost_reply_id(token), "assistant", "", now, "lost")


def _not_found(conversation_id: str) -> ConversationNotFound:
    return ConversationNotFound(f"no conversation {conversation_id}")


def _busy(conversation_id: str) -> ConversationBusy:
    return ConversationBusy(f"conversation {conversation_id} has a turn in progress")


def _full(max_messages: int) -> ConversationFull:
    return ConversationFull(f"conversation holds the maximum of {max_messages} messages")


def _limit_reached(max_conversations: int) -> ConversationLimitReached:
    return ConversationLimitReached(f"all {max_conversations} conversations have a turn in progress")


def _turn_lost(conversation_id: str) -> TurnLost:
    return TurnLost(
        f"the turn lost conversation {conversation_id}: its lock expired and another turn "
        "or a deletion took the conversation over"
    )


def _room_needed(orphaned: bool) -> int:
    """Messages a turn must find room for: its user message, its reply, and a ``lost`` reply
    for an earlier turn that never stored one."""
    return 3 if orphaned else 2
