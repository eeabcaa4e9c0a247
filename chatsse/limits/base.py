"""The limits' arithmetic and interface, the same for every store.

A **stream** is a turn being generated: it holds one lease from its admission until its reply
has ended (through a client's absence within the resume window too); reading it again, by
resuming, takes none. Leases expire ``lease_ttl`` seconds after they were last renewed, and
each worker renews the leases it holds every third of that, so the leases of a worker that
died free themselves.

**Requests and tokens per minute** are token buckets, as OpenAI describes its own: a bucket
holds up to the limit and refills continuously at the limit per minute. A turn takes one
request; it is admitted while the key has tokens left, and the tokens it used (prompt and
reply) are taken when it ends, so one turn can take the bucket below zero, and the next waits
until it has refilled above.

Each store makes :func:`decide`'s decision in one atomic step (the memory store in its event
loop, SQLite in one transaction, Redis in one script that mirrors this code), so workers
sharing a store share the limits exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from chatsse.errors import RateLimited
from chatsse.logs import get_logger

__all__ = [
    "Admission",
    "Bucket",
    "Decision",
    "HeldLeases",
    "Limiter",
    "Quota",
    "decide",
    "duration",
    "rate_headers",
    "refill",
    "refusal",
]

log = get_logger("chatsse.limits")
Refused = Literal["requests", "tokens", "streams", "server_streams"]
STREAM_RETRY_AFTER = 1  # seconds: when a stream will end is not known


@dataclass(frozen=True, slots=True)
class Quota:
    """What one caller may use; 0: no limit."""

    max_streams: int = 0  # the key's streams open at once
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    server_streams: int = 0  # every key's streams open at once, on every worker

    @property
    def leases(self) -> bool:
        """Whether a stream needs a lease."""
        return self.max_streams > 0 or self.server_streams > 0

    @property
    def limited(self) -> bool:
        return self.leases or self.requests_per_minute > 0 or self.tokens_per_minute > 0


@dataclass(slots=True)
class Bucket:
    level: float
    at: float  # when ``level`` was measured (seconds)


def refill(bucket: Bucket | None, limit: int, now: float) -> Bucket:
    """The bucket as it is at ``now`` (a new one is full)."""
    if bucket is None:
        return Bucket(float(limit), now)
    return Bucket(min(float(limit), bucket.level + max(0.0, now - bucket.at) * limit / 60), now)


@dataclass(frozen=True, slots=True)
class Decision:
    refused: Refused | None
    requests: Bucket | None  # the buckets after the decision (None: that limit is off)
    tokens: Bucket | None
    retry_after: float = 0.0


def decide(
    quota: Quota,
    now: float,
    requests: Bucket | None,
    tokens: Bucket | None,
    key_streams: int,
    all_streams: int,
) -> Decision:
    """Admit one turn or refuse it: given the key's buckets as stored and the live leases."""
    req = refill(requests, quota.requests_per_minute, now) if quota.requests_per_minute else None
    tok = refill(tokens, quota.tokens_per_minute, now) if quota.tokens_per_minute else None
    if req is not None and req.level < 1:
        return Decision("requests", req, tok, (1 - req.level) * 60 / quota.requests_per_minute)
    if tok is not None and tok.level <= 0:
        return Decision("tokens", req, tok, (1 - tok.level) * 60 / quota.tokens_per_minute)
    if quota.max_streams and key_streams >= quota.max_streams:
        return Decision("streams", req, tok, STREAM_RETRY_AFTER)
    if quota.server_streams and all_streams >= quota.server_streams:
        return Decision("server_streams", req, tok, STREAM_RETRY_AFTER)
    if req is not None:
        req.level -= 1
    return Decision(None, req, tok)


def charge(bucket: Bucket | None, limit: int, tokens: int, now: float) -> Bucket | None:
    """The tokens bucket once a turn's ``tokens`` are taken."""
    if not limit:
        return None
    after = refill(bucket, limit, now)
    after.level -= tokens
    return after


def duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` form: ``1s``, ``6m0s``, ``17ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rate_headers(quota: Quota, decision: Decision) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits that are on."""
    headers: dict[str, str] = {}
    for kind, limit, bucket in (
        ("requests", quota.requests_per_minute, decision.requests),
        ("tokens", quota.tokens_per_minute, decision.tokens),
    ):
        if limit and bucket is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{kind}"] = duration((limit - bucket.level) * 60 / limit)
    return headers


_MEANING: dict[Refused, str] = {
    "requests": "the key's requests per minute",
    "tokens": "the key's tokens per minute",
    "streams": "the key's streams open at once",
    "server_streams": "the server's streams open at once (CHATSSE_MAX_STREAMS)",
}


def refusal(quota: Quota, decision: Decision) -> RateLimited:
    assert decision.refused is not None
    limit = {
        "requests": quota.requests_per_minute,
        "tokens": quota.tokens_per_minute,
        "streams": quota.max_streams,
        "server_streams": quota.server_streams,
    }[decision.refused]
    return RateLimited(
        f"over {_MEANING[decision.refused]}: {limit}",
        retry_after=max(1, math.ceil(decision.retry_after)),
        rate_headers=rate_headers(quota, decision),
    )


@dataclass(slots=True)
class Admission:
    """One admitted turn: its lease (None: no stream limit is on) and what to send back."""

    owner: str
    quota: Quota
    lease: str | None
    headers: dict[str, str]


class Limiter(Protocol):
    async def admit(self, owner: str, quota: Quota) -> Admission:
        """Admit one turn of ``owner`` (take a request, and a lease), or raise ``RateLimited``."""
        ...

    async def finish(self, admission: Admission, tokens: int) -> None:
        """The turn has ended: free its lease, take the tokens it used."""
        ...

    async def close(self) -> None: ...


class HeldLeases:
    """The leases one worker holds (lease id -> owner), renewed every third of their life
    while any is held, by ``renew`` (one store step for all of them)."""

    def __init__(self, ttl: float, renew: Callable[[dict[str, str]], Awaitable[None]]) -> None:
        self.ttl = ttl
        self._renew = renew
        self.held: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, lease: str, owner: str) -> None:
        self.held[lease] = owner
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep())

    def discard(self, lease: str) -> None:
        self.held.pop(lease, None)

    async def _keep(self) -> None:
        while self.held:
            await asyncio.sleep(self.ttl / 3)
            if not self.held:
                return
            try:
                await self._renew(dict(self.held))
            except Exception as exc:  # the store is down: try again next time, while they live
                log.warning("leases_not_renewed", leases=len(self.held), error=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
