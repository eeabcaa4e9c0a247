"""Limits that hold across workers: per key, streams open at once, requests and tokens per
minute; per server, streams open at once (chatsse/limits/base.py has the rules). They live in
the conversation store, so every worker sharing it shares them: :func:`open_limiter` makes the
one for a store. Over a limit, a turn is refused with 429 (``RateLimited``)."""

from __future__ import annotations

import asyncio

from chatsse.auth import Caller
from chatsse.errors import StorageUnavailable
from chatsse.keys import KeyLimits
from chatsse.limits.base import Admission, Limiter, Quota
from chatsse.logs import get_logger
from chatsse.settings import Settings
from chatsse.stores.base import ConversationStore

__all__ = ["Admission", "Limiter", "Quota", "TurnLimits", "open_limiter", "quota_for"]

log = get_logger("chatsse.limits")
MAX_FINISHING = 10_000  # turns' ends being written at once; beyond, their leases expire instead


def open_limiter(store: ConversationStore, *, lease_ttl: float) -> Limiter:
    """The limits that live where ``store`` keeps its conversations."""
    if store.name == "sqlite":
        from chatsse.limits.sqlite import SQLiteLimiter
        from chatsse.stores.sqlite import SQLiteStore

        assert isinstance(store, SQLiteStore)
        return SQLiteLimiter(store, lease_ttl=lease_ttl)
    if store.name == "redis":
        from chatsse.limits.redis import RedisLimiter
        from chatsse.stores.redis import RedisStore

        assert isinstance(store, RedisStore)
        return RedisLimiter(store, lease_ttl=lease_ttl)
    from chatsse.limits.memory import MemoryLimiter

    return MemoryLimiter()


def quota_for(settings: Settings, limits: KeyLimits | None) -> Quota:
    """A caller's quota: its key's limits, or the server's defaults where the key sets none."""
    limits = limits or KeyLimits()

    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return Quota(
        max_streams=pick(limits.max_streams, settings.key_max_streams),
        requests_per_minute=pick(limits.requests_per_minute, settings.key_requests_per_minute),
        tokens_per_minute=pick(limits.tokens_per_minute, settings.key_tokens_per_minute),
        server_streams=settings.max_streams,
    )


class TurnLimits:
    """An app's limits: each caller's quota, the admission of a turn, and the end of an
    admitted turn, written in the background so that a stream's end never waits on the store.
    A server with no limit set makes no store call."""

    def __init__(self, settings: Settings, limiter: Limiter) -> None:
        self.settings = settings
        self.limiter = limiter
        self._anonymous = quota_for(settings, None)
        self._finishing: set[asyncio.Task[None]] = set()

    def quota(self, caller: Caller) -> Quota:
        return self._anonymous if caller.key is None else quota_for(self.settings, caller.key.limits)

    async def admit(self, caller: Caller) -> Admission | None:
        """Admit one turn of ``caller`` (``RateLimited`` over a limit); None: it has no limits."""
        quota = self.quota(caller)
        if not quota.limited:
            return None
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                return await self.limiter.admit(caller.owner, quota)
        except TimeoutError:
            raise StorageUnavailable(
                f"the limits did not answer within {self.settings.store_timeout:g} s (CHATSSE_STORE_TIMEOUT)"
            ) from None

    def finish(self, admission: Admission | None, tokens: int) -> None:
        """The turn has ended, having used ``tokens``: free its lease and pay for them."""
        if admission is None:
            return
        if len(self._finishing) >= MAX_FINISHING:
            log.warning("turn_end_not_written", owner=admission.owner)
            return
        task = asyncio.get_running_loop().create_task(self._finish(admission, tokens))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, admission: Admission, tokens: int) -> None:
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                await self.limiter.finish(admission, tokens)
        except Exception as exc:  # its lease expires on its own
            log.warning("turn_end_not_written", owner=admission.owner, error=f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=self.settings.store_timeout)
        await self.limiter.close()
