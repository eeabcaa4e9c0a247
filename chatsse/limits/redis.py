"""Limits in the Redis of the conversations (``CHATSSE_STORE=redis://...``): every worker on
every machine shares them. Each decision is one Lua script (atomic in Redis) on Redis's own
clock (``TIME``), one clock for all machines; the script is :func:`chatsse.limits.base.decide`
written again in Lua."""

from __future__ import annotations

from redis.exceptions import RedisError

from chatsse.errors import StorageUnavailable
from chatsse.ids import new_id
from chatsse.limits.base import (
    STREAM_RETRY_AFTER,
    Admission,
    Bucket,
    Decision,
    HeldLeases,
    Quota,
    rate_headers,
    refusal,
)
from chatsse.stores.redis import RedisStore

__all__ = ["RedisLimiter"]

# Keys: <prefix>limits:leases (every lease; sorted set, score: expiry in ms),
# <prefix>limits:leases:<owner> (the owner's), <prefix>limits:bucket:<owner> (hash: the
# buckets' levels and times, expiring when idle long enough to be full again).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local nowms = math.floor(now * 1000)
local function level(bucket, kind, limit)
  local found = redis.call('HMGET', bucket, kind .. ':level', kind .. ':at')
  if not found[1] then return limit end
  return math.min(limit, tonumber(found[1]) + math.max(0, now - tonumber(found[2])) * limit / 60)
end
"""
# KEYS: all leases, the owner's leases, the owner's buckets. ARGV: lease id ('' for none),
# lease ttl ms, max_streams, server_streams, requests/min, tokens/min.
# Returns {verdict, retry after, requests level, tokens level}; verdict 'ok' or what refused.
_ADMIT = (
    _PRELUDE
    + """
local all, mine, bucket = KEYS[1], KEYS[2], KEYS[3]
local max_streams, server_streams = tonumber(ARGV[3]), tonumber(ARGV[4])
local rpm, tpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local req, tok = -1, -1
if rpm > 0 then req = level(bucket, 'requests', rpm) end
if tpm > 0 then tok = level(bucket, 'tokens', tpm) end
local function refused(kind, wait) return {kind, tostring(wait), tostring(req), tostring(tok)} end
if rpm > 0 and req < 1 then return refused('requests', (1 - req) * 60 / rpm) end
if tpm > 0 and tok <= 0 then return refused('tokens', (1 - tok) * 60 / tpm) end
redis.call('ZREMRANGEBYSCORE', all, '-inf', nowms)
redis.call('ZREMRANGEBYSCORE', mine, '-inf', nowms)
if max_streams > 0 and redis.call('ZCARD', mine) >= max_streams then
  return refused('streams', 0)
end
if server_streams > 0 and redis.call('ZCARD', all) >= server_streams then
  return refused('server_streams', 0)
end
if ARGV[1] ~= '' then
  local expires, ttl = nowms + tonumber(ARGV[2]), tonumber(ARGV[2])
  redis.call('ZADD', all, expires, ARGV[1])
  redis.call('ZADD', mine, expires, ARGV[1])
  redis.call('PEXPIRE', all, 2 * ttl)
  redis.call('PEXPIRE', mine, 2 * ttl)
end
if rpm > 0 then
  req = req - 1
  redis.call('HSET', bucket, 'requests:level', req, 'requests:at', now)
end
if tpm > 0 then redis.call('HSET', bucket, 'tokens:level', tok, 'tokens:at', now) end
if rpm > 0 or tpm > 0 then redis.call('PEXPIRE', bucket, 120000) end
return {'ok', '0', tostring(req), tostring(tok)}
"""
)
# KEYS: all leases, the owner's leases, the owner's buckets. ARGV: lease id ('' for none),
# tokens/min, the turn's tokens.
_FINISH = (
    _PRELUDE
    + """
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local tpm = tonumber(ARGV[2])
if tpm > 0 then
  local tok = level(KEYS[3], 'tokens', tpm) - tonumber(ARGV[3])
  redis.call('HSET', KEYS[3], 'tokens:level', tok, 'tokens:at', now)
  redis.call('PEXPIRE', KEYS[3], 120000)
end
return 1
"""
)
# KEYS: all leases, then each lease's owner's leases. ARGV: lease ttl ms, then the lease ids.
_RENEW = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[1])
local expires = nowms + ttl
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
  redis.call('ZADD', KEYS[i], 'XX', expires, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], 2 * ttl)
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return 1
"""
)


class RedisLimiter:
    def __init__(self, store: RedisStore, *, lease_ttl: float) -> None:
        self._redis = store._redis
        self._prefix = f"{store.prefix}limits:"
        self.lease_ttl = lease_ttl
        self._ttl_ms = max(1, round(lease_ttl * 1000))
        self._leases = HeldLeases(lease_ttl, self._renew)
        self._admit = self._redis.register_script(_ADMIT)
        self._finish = self._redis.register_script(_FINISH)
        self._renew_script = self._redis.register_script(_RENEW)

    def _keys(self, owner: str) -> list[str]:
        return [f"{self._prefix}leases", f"{self._prefix}leases:{owner}", f"{self._prefix}bucket:{owner}"]

    async def _call(self, script: object, keys: list[str], args: list[str | int]) -> list[str]:
        try:
            result: list[str] = await script(keys, args)  # type: ignore[operator]
        except RedisError as exc:
            raise StorageUnavailable(f"the Redis limits failed: {type(exc).__name__}: {exc}") from exc
        return result

    async def admit(self, owner: str, quota: Quota) -> Admission:
        lease = new_id("lease_") if quota.leases else None
        args: list[str | int] = [
            lease or "", self._ttl_ms, quota.max_streams, quota.server_streams,
            quota.requests_per_minute, quota.tokens_per_minute,
        ]  # fmt: skip
        verdict, retry_after, requests, tokens = await self._call(self._admit, self._keys(owner), args)
        decision = Decision(
            None if verdict == "ok" else verdict,  # type: ignore[arg-type]
            Bucket(float(requests), 0.0) if quota.requests_per_minute else None,
            Bucket(float(tokens), 0.0) if quota.tokens_per_minute else None,
            float(retry_after) if verdict in ("requests", "tokens") else STREAM_RETRY_AFTER,
        )
        if decision.refused is not None:
            raise refusal(quota, decision)
        if lease is not None:
            self._leases.add(lease, owner)
        return Admission(owner, quota, lease, rate_headers(quota, decision))

    async def finish(self, admission: Admission, tokens: int) -> None:
        lease, quota = admission.lease, admission.quota
        if lease is not None:
            self._leases.discard(lease)
        if lease is None and not quota.tokens_per_minute:
            return
        args: list[str | int] = [lease or "", quota.tokens_per_minute, tokens]
        await self._call(self._finish, self._keys(admission.owner), args)

    async def _renew(self, held: dict[str, str]) -> None:
        keys = [f"{self._prefix}leases", *(f"{self._prefix}leases:{owner}" for owner in held.values())]
        await self._call(self._renew_script, keys, [self._ttl_ms, *held])

    async def close(self) -> None:
        await self._leases.close()
