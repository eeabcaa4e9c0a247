"""The replay log interface (chatsse/replay/__init__.py says what a log holds).

Every log keeps the same policies (one test suite, tests/test_replay.py, runs against each):

- Appends are idempotent: items already logged at those positions are skipped, so a flush
  retried after a lost answer does no harm; a gap (``start`` past the log's end) is refused.
- ``done`` marks the log complete: the last item is the stream's last event; later appends
  are ignored.
- Bounded: at most ``max_items`` items per log (more are refused with ``ValueError``), and a
  log lives ``ttl`` seconds after its last append, complete or not: a log whose writer died
  mid-reply is still readable for that long, then gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Replay", "ReplayLimits", "ReplayLog", "ReplayMeta", "ReplayWrite", "append"]


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    ttl: float  # seconds a log lives after its last append
    max_items: int  # items in one log
    max_logs: int = 100_000  # logs held at once (the memory log; the others expire them)
    poll_interval: float = 0.05  # seconds between two looks at a shared log's live tail

    def __post_init__(self) -> None:
        if not self.ttl > 0 or not self.poll_interval > 0:
            raise ValueError("ttl and poll_interval must be positive")
        if self.max_items < 2 or self.max_logs < 1:
            raise ValueError("max_items must be at least 2 and max_logs at least 1")


@dataclass(frozen=True, slots=True)
class ReplayMeta:
    """Whose stream a log holds: the conversation, and the front that wrote it."""

    conversation_id: str
    front: str


@dataclass(frozen=True, slots=True)
class ReplayWrite:
    """One append: ``items`` at positions ``start``, ``start + 1``, ...; ``done``: the last one
    is the stream's last event. No items: the log's life is renewed (a writer's heartbeat)."""

    reply_id: str
    start: int
    items: Sequence[str]
    meta: ReplayMeta
    done: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """What a read found: ``items`` from position ``first``, of ``length`` logged so far;
    ``age``: seconds since the log's last append (the SQLite log's may be up to a second more:
    it renews a log's life at most once a second)."""

    meta: ReplayMeta
    first: int
    items: list[str]
    length: int
    done: bool
    age: float = 0.0

    @property
    def complete(self) -> bool:
        """The read reached the end of a finished stream."""
        return self.done and self.first + len(self.items) >= self.length


class ReplayLog(Protocol):
    limits: ReplayLimits

    async def append_many(self, writes: Sequence[ReplayWrite]) -> list[ValueError | None]:
        """Make several appends in one step of the store (one transaction, one round trip);
        for each, the ``ValueError`` that refused it (a gap, or past ``max_items``), or None."""
        ...

    async def read(self, reply_id: str, after: int = -1, *, limit: int = 1000) -> Replay | None:
        """Up to ``limit`` items after position ``after`` (-1: from the start); None if there
        is no log for ``reply_id`` (never written, or expired)."""
        ...

    async def wait(self, reply_id: str, length: int, within: float) -> None:
        """Return once the log may hold more than ``length`` items, or after ``within`` seconds."""
        ...

    async def close(self) -> None: ...


def _check_append(length: int, start: int, count: int, max_items: int) -> int:
    """How many of ``count`` items starting at ``start`` are new; ValueError on a gap or
    past the bound."""
    if start > length:
        raise ValueError(f"append at {start} leaves a gap after {length} logged items")
    if start + count > max_items:
        raise ValueError(f"a replay log holds at most {max_items} items")
    return max(0, start + count - length)


async def append(
    log: ReplayLog, reply_id: str, start: int, items: Sequence[str], *, meta: ReplayMeta, done: bool = False
) -> None:
    """One append (:meth:`ReplayLog.append_many`); raises the ``ValueError`` that refused it."""
    (refused,) = await log.append_many([ReplayWrite(reply_id, start, items, meta, done)])
    if refused is not None:
        raise refused
