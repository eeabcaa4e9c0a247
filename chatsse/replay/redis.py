"""Replay logs in the Redis of the conversations (``CHATSSE_STORE=redis://...``): a hash of
facts and a list of items per reply, written and read by Lua scripts (one atomic step each),
expiring on Redis's own clock. Readers on any machine look again every ``poll_interval``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from redis.exceptions import RedisError, ResponseError

from chatsse.errors import StorageUnavailable
from chatsse.replay.base import Replay, ReplayLimits, ReplayMeta, ReplayWrite
from chatsse.stores.redis import RedisStore

__all__ = ["RedisReplayLog"]

# KEYS: facts hash, items list. ARGV: start, max_items, done, ttl_ms, conversation_id, front,
# then the items. Returns the log's length.
_APPEND = """
local facts, items = KEYS[1], KEYS[2]
if redis.call('HGET', facts, 'done') == '1' then return -1 end
local length = tonumber(redis.call('HGET', facts, 'length') or '0')
local start, max_items = tonumber(ARGV[1]), tonumber(ARGV[2])
local count = #ARGV - 6
if start > length then return redis.error_reply('replay gap: at ' .. start .. ' after ' .. length) end
if start + count > max_items then return redis.error_reply('replay full: ' .. max_items .. ' items') end
for i = length - start + 1, count do redis.call('RPUSH', items, ARGV[6 + i]) end
length = math.max(length, start + count)
redis.call('HSET', facts, 'length', length, 'done', ARGV[3], 'conversation_id', ARGV[5], 'front', ARGV[6])
redis.call('PEXPIRE', facts, ARGV[4])
if length > 0 then redis.call('PEXPIRE', items, ARGV[4]) end
return length
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

    def _args(self, write: ReplayWrite) -> list[str | int]:
        limits, meta = self.limits, write.meta
        head: list[str | int] = [write.start, limits.max_items, int(write.done), self._ttl_ms]
        return [*head, meta.conversation_id, meta.front, *write.items]

    async def append_many(self, writes: Sequence[ReplayWrite]) -> list[ValueError | None]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for write in writes:
                    await self._append(self._keys(write.reply_id), self._args(write), client=pipe)
                results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise StorageUnavailable(f"the Redis replay log failed: {type(exc).__name__}: {exc}") from exc
        refused: list[ValueError | None] = []
        for result in results:
            if isinstance(result, ResponseError) and str(result).startswith("replay "):
                refused.append(ValueError(str(result)))
            elif isinstance(result, Exception):
                raise StorageUnavailable(f"the Redis replay log failed: {result}")
            else:
                refused.append(None)
        return refused

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
