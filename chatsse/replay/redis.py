"""Replay logs in the Redis of the conversations (``CHATSSE_STORE=redis://...``): a hash of
facts and a list of items per reply, written and read by Lua scripts (one atomic step, one
round trip each: a batch of appends to many logs is one script call),
expiring on Redis's own clock. Readers on any machine look again every ``poll_interval``.
And the replies' signals (``RedisSignals``): a ``PUBLISH`` each, one subscription per worker."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence

from redis.exceptions import RedisError

from chatsse.errors import StorageUnavailable
from chatsse.logs import get_logger
from chatsse.replay.base import Replay, ReplayLimits, ReplayMeta, ReplayWrite
from chatsse.replay.signals import SignalKind, _Watching
from chatsse.stores.redis import RedisStore

__all__ = ["RedisReplayLog", "RedisSignals"]

log = get_logger("chatsse.replay")

# Many appends in one call. KEYS: a facts hash and an items list per log. ARGV: max_items,
# ttl_ms, then per log: start, done, conversation_id, front, the number of items, the items.
# Returns, per log, its length, -1 if it was complete already, or an error message.
_APPEND = """
local max_items, ttl = tonumber(ARGV[1]), ARGV[2]
local out, at = {}, 3
for k = 1, #KEYS, 2 do
  local facts, items = KEYS[k], KEYS[k + 1]
  local start, done, count = tonumber(ARGV[at]), ARGV[at + 1], tonumber(ARGV[at + 4])
  local first = at + 5
  at = first + count
  local length = tonumber(redis.call('HGET', facts, 'length') or '0')
  if redis.call('HGET', facts, 'done') == '1' then
    out[#out + 1] = -1
  elseif start > length then
    out[#out + 1] = 'replay gap: at ' .. start .. ' after ' .. length
  elseif start + count > max_items then
    out[#out + 1] = 'replay full: ' .. max_items .. ' items'
  else
    for i = first + length - start, first + count - 1 do redis.call('RPUSH', items, ARGV[i]) end
    length = math.max(length, start + count)
    redis.call('HSET', facts, 'length', length, 'done', done, 'conversation_id', ARGV[first - 3],
               'front', ARGV[first - 2])
    redis.call('PEXPIRE', facts, ttl)
    if length > 0 then redis.call('PEXPIRE', items, ttl) end
    out[#out + 1] = length
  end
end
return out
"""
# KEYS: facts hash, items list. ARGV: first position, last position. Returns false, or
# {conversation_id, front, length, done, milliseconds to live, items...}.
_READ = """
local facts = redis.call('HMGET', KEYS[1], 'conversation_id', 'front', 'length', 'done')
if not facts[1] then return false end
local out = {facts[1], facts[2], facts[3], facts[4], tostring(redis.call('PTTL', KEYS[1]))}
for _, item in ipairs(redis.call('LRANGE', KEYS[2], ARGV[1], ARGV[2])) do out[#out + 1] = item end
return out
"""


class RedisReplayLog:
    def __init__(self, store: RedisStore, limits: ReplayLimits) -> None:
        self.limits = limits
        self._redis = store._redis
        self._prefix = store.prefix
        self._ttl_ms = math.ceil(limits.ttl * 1000)
        self._append = self._redis.register_script(_APPEND)
        self._read = self._redis.register_script(_READ)

    def _keys(self, reply_id: str) -> list[str]:
        return [f"{self._prefix}replay:{reply_id}", f"{self._prefix}replay-items:{reply_id}"]

    async def append_many(self, writes: Sequence[ReplayWrite]) -> list[ValueError | None]:
        keys: list[str] = []
        args: list[str | int] = [self.limits.max_items, self._ttl_ms]
        for write in writes:
            keys += self._keys(write.reply_id)
            meta = write.meta
            args += [
                write.start,
                int(write.done),
                meta.conversation_id,
                meta.front,
                len(write.items),
                *write.items,
            ]
        try:
            results = await self._append(keys, args)
        except RedisError as exc:
            raise StorageUnavailable(f"the Redis replay log failed: {type(exc).__name__}: {exc}") from exc
        return [ValueError(result) if isinstance(result, str) else None for result in results]

    async def read(self, reply_id: str, after: int = -1, *, limit: int = 1000) -> Replay | None:
        first = after + 1
        try:
            found = await self._read(self._keys(reply_id), [first, first + limit - 1])
        except RedisError as exc:
            raise StorageUnavailable(f"the Redis replay log failed: {type(exc).__name__}: {exc}") from exc
        if not found:
            return None
        conversation_id, front, length, done, to_live, *items = found
        age = max(0.0, self.limits.ttl - int(to_live) / 1000)
        return Replay(ReplayMeta(conversation_id, front), first, items, int(length), done == "1", age)

    async def wait(self, reply_id: str, length: int, within: float) -> None:
        await asyncio.sleep(min(within, self.limits.poll_interval))

    async def close(self) -> None:
        return None  # the store closes the client


_RECONNECT = 0.5  # seconds before a lost Redis subscription is made again


class RedisSignals(_Watching):
    """``PUBLISH <prefix>signals "<kind> <reply id>"``; a subscription per watching worker."""

    def __init__(self, store: RedisStore) -> None:
        super().__init__()
        self._redis = store._redis
        self._channel = store.prefix + "signals"

    async def send(self, reply_id: str, kind: SignalKind) -> None:
        try:
            await self._redis.publish(self._channel, f"{kind} {reply_id}")
        except RedisError as exc:
            raise StorageUnavailable(f"the Redis store failed: {type(exc).__name__}: {exc}") from exc

    async def _listen(self) -> None:
        while self._watchers:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                while self._watchers:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        kind, _, reply_id = str(message["data"]).partition(" ")
                        self._deliver(reply_id, kind)
            except RedisError as exc:  # Redis restarted: subscribe again
                log.warning("signal_subscription_lost", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(_RECONNECT)
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
