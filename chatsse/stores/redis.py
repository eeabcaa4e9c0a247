"""Conversations in Redis, shared by workers on any number of machines:
``CHATSSE_STORE=redis://host:port/db``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chatsse.errors import StorageUnavailable
from chatsse.models import ConversationInfo, Message
from chatsse.stores.base import StoreLimits, _busy, _full, _limit_reached, _not_found, _turn_lost

__all__ = ["RedisStore"]

Clock = Callable[[], float]

# Every script starts with this prelude. KEYS[1] is the activity sorted set (member: the
# conversation id, score: updated_at); ARGV[1..4] are the key prefix, now, now - ttl and the
# backstop key expiry in ms. A conversation is <prefix>meta:<id> (hash: created_at,
# updated_at, owner, and turn: the token of the turn that holds or last held the lock, until
# that turn ends), <prefix>messages:<id> (list of JSON messages) and <prefix>lock:<id>
# (string: the token, with PX lock_ttl on Redis's clock); <prefix>owned:<owner> is each
# owner's activity sorted set, kept beside the global one. sweep() drops every conversation
# idle past the TTL whose lock key is gone (never held, released, or expired).
_PRELUDE = """
local active, prefix, now, deadline = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local backstop = tonumber(ARGV[4])
local function keep(key)
    if backstop > 0 then redis.call('PEXPIRE', key, backstop) end
end
local function owner_of(id)
    return redis.call('HGET', prefix .. 'meta:' .. id, 'owner') or ''
end
local function drop(id)
    redis.call('ZREM', prefix .. 'owned:' .. owner_of(id), id)
    redis.call('DEL', prefix .. 'meta:' .. id, prefix .. 'messages:' .. id, prefix .. 'lock:' .. id)
    redis.call('ZREM', active, id)
end
local function touch(id, owner)
    local owned = prefix .. 'owned:' .. owner
    redis.call('ZADD', active, now, id)
    redis.call('ZADD', owned, now, id)
    keep(active)
    keep(owned)
end
local function locked(id)
    return redis.call('EXISTS', prefix .. 'lock:' .. id) == 1
end
local function sweep()
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', active, '-inf', deadline)) do
        if not locked(id) then drop(id) end
    end
end
local function last_id(messages)
    local last = redis.call('LINDEX', messages, -1)
    if last then return cjson.decode(last)['id'] end
    return nil
end
-- Make room for one more conversation: nothing to do under the cap, else evict the least
-- recently active unlocked one. Returns evictions (0 or 1), or -1 if every one is locked.
local function make_room(max_conversations)
    if redis.call('ZCARD', active) < max_conversations then return 0 end
    local start = 0
    repeat
        local batch = redis.call('ZRANGE', active, start, start + 99)
        for _, id in ipairs(batch) do
            if not locked(id) then drop(id); return 1 end
        end
        start = start + 100
    until #batch < 100
    return -1
end
local function create(meta, id, max_conversations, owner)
    if redis.call('EXISTS', meta) == 1 then return -2 end
    local evicted = make_room(max_conversations)
    if evicted < 0 then return -1 end
    redis.call('HSET', meta, 'created_at', now, 'updated_at', now, 'owner', owner)
    touch(id, owner)
    keep(meta)
    return evicted
end
-- The conversation exists and belongs to the owner.
local function owned(meta, owner)
    if redis.call('EXISTS', meta) == 0 then return false end
    return (redis.call('HGET', meta, 'owner') or '') == owner
end
"""

# KEYS[2]: meta. ARGV[5..7]: id, max_conversations, owner. Returns -2 (id exists), -1 (cap
# reached, all locked), else evictions (0/1).
_CREATE = """
sweep()
return create(KEYS[2], ARGV[5], tonumber(ARGV[6]), ARGV[7])
"""

# KEYS[2..4]: meta, messages, lock. ARGV[5..]: id, new ('1'/'0'), token, lock ms,
# max_conversations, max_messages, history, the user message's JSON, owner.
# Returns {evictions, messages}, or {-1} cap, {-2} exists, {-3} not found, {-4} busy, {-5} full.
_BEGIN_TURN = """
sweep()
local meta, messages, id, token = KEYS[2], KEYS[3], ARGV[5], ARGV[7]
local max_messages, history, owner = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[13]
local held = redis.call('HGET', meta, 'turn')
if held == token then return {0, redis.call('LRANGE', messages, -history, -1)} end
local evicted = 0
if ARGV[6] == '1' then
    if 2 > max_messages then return {-5} end
    evicted = create(meta, id, tonumber(ARGV[9]), owner)
    if evicted < 0 then return {evicted} end
else
    if not owned(meta, owner) then return {-3} end
    if locked(id) then return {-4} end
    local room = 2
    if held then room = 3 end
    if redis.call('LLEN', messages) + room > max_messages then return {-5} end
    if held then
        redis.call('RPUSH', messages, '{"id":"lost_' .. held .. '","role":"assistant","content":"",'
            .. '"created_at":' .. now .. ',"finish_reason":"lost"}')
    end
end
redis.call('RPUSH', messages, ARGV[12])
redis.call('HSET', meta, 'updated_at', now, 'turn', token)
redis.call('SET', KEYS[4], token, 'PX', ARGV[8])
touch(id, owner)
keep(meta)
keep(messages)
return {evicted, redis.call('LRANGE', messages, -history, -1)}
"""

# KEYS[2..4]: meta, messages, lock. ARGV[5..]: id, token, the reply's JSON, the reply's id.
# Returns 1 (stored now or before) or 0 (the turn lost the conversation).
_FINISH_TURN = """
local meta, messages = KEYS[2], KEYS[3]
if redis.call('HGET', meta, 'turn') ~= ARGV[6] then
    if last_id(messages) == ARGV[8] then return 1 end
    return 0
end
redis.call('RPUSH', messages, ARGV[7])
redis.call('HSET', meta, 'updated_at', now)
redis.call('HDEL', meta, 'turn')
if redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
touch(ARGV[5], owner_of(ARGV[5]))
keep(meta)
keep(messages)
return 1
"""

# KEYS[2..4]: meta, messages, lock. ARGV[5..]: id, token, user message id, new ('1'/'0').
# Returns 1 (undone) or 0 (nothing to undo).
_CANCEL_TURN = """
local meta, messages = KEYS[2], KEYS[3]
if redis.call('HGET', meta, 'turn') ~= ARGV[6] then return 0 end
local updated = tonumber(redis.call('HGET', meta, 'updated_at'))
if ARGV[8] == '1' or updated <= tonumber(deadline) then
    drop(ARGV[5])
    return 1
end
if last_id(messages) == ARGV[7] then redis.call('RPOP', messages) end
redis.call('HDEL', meta, 'turn')
if redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS[2..3]: meta, messages. ARGV[5]: owner. Returns false, or {created_at, updated_at,
# message count}.
_INFO = """
sweep()
if not owned(KEYS[2], ARGV[5]) then return false end
local meta = redis.call('HMGET', KEYS[2], 'created_at', 'updated_at')
if not meta[1] then return false end
return {meta[1], meta[2], redis.call('LLEN', KEYS[3])}
"""

# KEYS[2..3]: meta, messages. ARGV[5..7]: LRANGE start, stop, owner. Returns {0} or
# {1, messages}.
_MESSAGES = """
sweep()
if not owned(KEYS[2], ARGV[7]) then return {0} end
return {1, redis.call('LRANGE', KEYS[3], ARGV[5], ARGV[6])}
"""

# KEYS[2]: meta. ARGV[5..6]: id, owner. Returns 0 (not found), -1 (locked) or 1.
_DELETE = """
sweep()
if not owned(KEYS[2], ARGV[6]) then return 0 end
if locked(ARGV[5]) then return -1 end
drop(ARGV[5])
return 1
"""

# ARGV[5..6]: limit (>= 1), owner. Returns {{id, created_at, updated_at, message count}, ...}.
_LIST = """
sweep()
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', prefix .. 'owned:' .. ARGV[6], 0, tonumber(ARGV[5]) - 1)) do
    local meta = redis.call('HMGET', prefix .. 'meta:' .. id, 'created_at', 'updated_at')
    if meta[1] then
        out[#out + 1] = {id, meta[1], meta[2], redis.call('LLEN', prefix .. 'messages:' .. id)}
    end
end
return out
"""

# ARGV[5]: '1' to count one owner's, ARGV[6]: that owner.
_COUNT = """
sweep()
if ARGV[5] == '1' then return redis.call('ZCARD', prefix .. 'owned:' .. ARGV[6]) end
return redis.call('ZCARD', active)
"""

_BEGIN_ERRORS = {-1: "limit", -2: "exists", -3: "not_found", -4: "busy", -5: "full"}


def _message_json(message: Message) -> str:
    return json.dumps(message.to_dict(), separators=(",", ":"))


def _message_from_json(text: str) -> Message:
    return Message(**json.loads(text))


class RedisStore:
    """Conversations in Redis, shared by any number of workers on any number of machines.

    Every operation is one Lua script: Redis runs a script atomically, so the expiry sweep,
    the checks and the writes of one operation never interleave with another worker's, and
    each costs one round trip (WATCH/MULTI would retry under contention and take several).
    The TTL runs on ``clock`` (the times are passed in); as a backstop, every key a write
    touches gets a Redis expiry of ``ttl + lock_ttl``, so data abandoned with the deployment
    still goes away. The turn lock is ``SET lock:<id> token PX lock_ttl``, on Redis's own
    clock, one clock for all machines.

    ``timeout`` bounds connecting and each reply (socket timeouts); a failed call is retried
    once on a fresh connection only when the connection broke (a pooled connection to a Redis
    that restarted), which is safe because every turn script is idempotent for its token.
    Failures of Redis are raised as ``StorageUnavailable``.

    The scripts reach keys of other conversations (sweep, eviction) that they do not declare,
    so this needs a single Redis server (or a primary with replicas), not Redis Cluster.
    """

    name = "redis"
    local = False

    def __init__(
        self,
        url: str,
        limits: StoreLimits,
        *,
        timeout: float = 5.0,
        clock: Clock = time.time,
        prefix: str = "chatsse:",
    ) -> None:
        self.limits = limits
        self.prefix = prefix
        self.evicted = 0
        self._clock = clock
        self._lock_ms = max(1, round(limits.lock_ttl * 1000))
        backstop = (limits.ttl + limits.lock_ttl) * 1000
        self._backstop_ms = math.ceil(backstop) if math.isfinite(backstop) else 0
        self._redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._active = prefix + "active"
        script = self._redis.register_script
        self._create = script(_PRELUDE + _CREATE)
        self._begin_turn = script(_PRELUDE + _BEGIN_TURN)
        self._finish_turn = script(_PRELUDE + _FINISH_TURN)
        self._cancel_turn = script(_PRELUDE + _CANCEL_TURN)
        self._info = script(_PRELUDE + _INFO)
        self._messages = script(_PRELUDE + _MESSAGES)
        self._delete = script(_PRELUDE + _DELETE)
        self._list = script(_PRELUDE + _LIST)
        self._count = script(_PRELUDE + _COUNT)

    def key(self, kind: str, conversation_id: str) -> str:
        """The Redis key of a conversation's ``meta``, ``messages`` or ``lock``."""
        return f"{self.prefix}{kind}:{conversation_id}"

    async def _call(self, script: AsyncScript, conversation_id: str | None, *args: str | int | float) -> Any:
        keys = [self._active]
        if conversation_id is not None:
            keys += [self.key(kind, conversation_id) for kind in ("meta", "messages", "lock")]
        now = self._clock()
        try:
            return await script(keys, [self.prefix, now, now - self.limits.ttl, self._backstop_ms, *args])
        except RedisError as exc:
            raise StorageUnavailable(f"the Redis store failed: {type(exc).__name__}: {exc}") from exc

    async def begin_turn(
        self, conversation_id: str, user: Message, *, token: str, new: bool, history: int, owner: str = ""
    ) -> list[Message]:
        max_conversations, max_messages = self.limits.max_conversations, self.limits.max_messages
        result = await self._call(
            self._begin_turn, conversation_id, conversation_id, "1" if new else "0", token, self._lock_ms,
            max_conversations, max_messages, history, _message_json(user), owner,
        )  # fmt: skip
        code = int(result[0])
        if code < 0:
            error = _BEGIN_ERRORS[code]
            if error == "exists":
                raise ValueError(f"conversation {conversation_id} exists")
            raise {
                "limit": _limit_reached(max_conversations),
                "not_found": _not_found(conversation_id),
                "busy": _busy(conversation_id),
                "full": _full(max_messages),
            }[error]
        self.evicted += code
        return [_message_from_json(text) for text in result[1]]

    async def finish_turn(self, conversation_id: str, reply: Message, *, token: str) -> None:
        stored = await self._call(
            self._finish_turn, conversation_id, conversation_id, token, _message_json(reply), reply.id
        )
        if not stored:
            raise _turn_lost(conversation_id)

    async def cancel_turn(self, conversation_id: str, *, token: str, user_message_id: str, new: bool) -> bool:
        undone = await self._call(
            self._cancel_turn, conversation_id, conversation_id, token, user_message_id, "1" if new else "0"
        )
        return bool(undone)

    async def create(self, conversation_id: str, *, owner: str = "") -> ConversationInfo:
        now = self._clock()
        result = int(
            await self._call(
                self._create, conversation_id, conversation_id, self.limits.max_conversations, owner
            )
        )
        if result == -2:
            raise ValueError(f"conversation {conversation_id} exists")
        if result == -1:
            raise _limit_reached(self.limits.max_conversations)
        self.evicted += result
        return ConversationInfo(conversation_id, now, now, 0)

    async def info(self, conversation_id: str, *, owner: str = "") -> ConversationInfo | None:
        result = await self._call(self._info, conversation_id, owner)
        if not result:
            return None
        created_at, updated_at, count = result
        return ConversationInfo(conversation_id, float(created_at), float(updated_at), int(count))

    async def messages(
        self, conversation_id: str, last: int | None = None, *, owner: str = ""
    ) -> list[Message]:
        if last is None:
            start, stop = 0, -1
        elif last > 0:
            start, stop = -last, -1
        else:
            start, stop = 1, 0  # an empty range, after the existence check
        result = await self._call(self._messages, conversation_id, start, stop, owner)
        if result[0] == 0:
            raise _not_found(conversation_id)
        return [_message_from_json(text) for text in result[1]]

    async def delete(self, conversation_id: str, *, owner: str = "") -> bool:
        result = await self._call(self._delete, conversation_id, conversation_id, owner)
        if result == -1:
            raise _busy(conversation_id)
        return bool(result == 1)

    async def list(self, limit: int, *, owner: str = "") -> list[ConversationInfo]:
        if limit <= 0:
            return []
        rows: list[list[Any]] = await self._call(self._list, None, limit, owner)
        return [
            ConversationInfo(cid, float(created), float(updated), int(n)) for cid, created, updated, n in rows
        ]

    async def count(self, *, owner: str | None = None) -> int:
        return int(await self._call(self._count, None, "0" if owner is None else "1", owner or ""))

    async def close(self) -> None:
        await self._redis.aclose()
