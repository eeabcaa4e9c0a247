"""Replay logs in one process's memory (``CHATSSE_STORE=memory``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chatsse.replay.base import Replay, ReplayLimits, ReplayMeta, ReplayWrite, _check_append

__all__ = ["MemoryReplayLog"]


@dataclass(slots=True)
class _Log:
    meta: ReplayMeta
    items: list[str] = field(default_factory=list)
    done: bool = False
    expires_at: float = 0.0
    grew: asyncio.Event | None = None  # made by the first reader that waits


class MemoryReplayLog:
    """Logs in a dict ordered by last append; the oldest goes first at ``max_logs``. A waiting
    reader wakes at once when its log grows (one process: no polling)."""

    def __init__(self, limits: ReplayLimits, *, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self._clock = clock
        self._logs: OrderedDict[str, _Log] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._logs:
            reply_id, log = next(iter(self._logs.items()))
            if log.expires_at > now and len(self._logs) <= self.limits.max_logs:
                return
            del self._logs[reply_id]
            if log.grew is not None:
                log.grew.set()

    async def append_many(self, writes: Sequence[ReplayWrite]) -> list[ValueError | None]:
        now = self._clock()
        self._expire(now)
        refused: list[ValueError | None] = []
        for write in writes:
            try:
                self._append(write, now)
            except ValueError as exc:
                refused.append(exc)
            else:
                refused.append(None)
        self._expire(now)
        return refused

    def _append(self, write: ReplayWrite, now: float) -> None:
        log = self._logs.get(write.reply_id)
        if log is not None and log.done:
            return
        items = write.items
        new = _check_append(
            0 if log is None else len(log.items), write.start, len(items), self.limits.max_items
        )
        if log is None:
            log = self._logs[write.reply_id] = _Log(write.meta)
        if new:
            log.items.extend(items[len(items) - new :])
        log.done = write.done
        log.expires_at = now + self.limits.ttl
        self._logs.move_to_end(write.reply_id)
        if log.grew is not None:
            log.grew.set()
            log.grew = None

    async def read(self, reply_id: str, after: int = -1, *, limit: int = 1000) -> Replay | None:
        self._expire(self._clock())
        log = self._logs.get(reply_id)
        if log is None:
            return None
        first = after + 1
        age = self._clock() - (log.expires_at - self.limits.ttl)
        return Replay(log.meta, first, log.items[first : first + limit], len(log.items), log.done, age)

    async def wait(self, reply_id: str, length: int, within: float) -> None:
        log = self._logs.get(reply_id)
        if log is None or log.done or len(log.items) > length:
            return
        if log.grew is None:
            log.grew = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await log.grew.wait()

    async def close(self) -> None:
        self._logs.clear()
