"""Limits in one process's memory (``CHATSSE_STORE=memory``, one worker)."""

from __future__ import annotations

import time
from collections.abc import Callable

from chatsse.ids import new_id
from chatsse.limits.base import Admission, Bucket, Quota, charge, decide, rate_headers, refusal

__all__ = ["MemoryLimiter"]


class MemoryLimiter:
    """Every call runs to its end without awaiting, so each is atomic in the event loop."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, set[str]] = {}  # owner -> its leases
        self._buckets: dict[tuple[str, str], Bucket] = {}  # (owner, "requests" | "tokens")

    @property
    def open_streams(self) -> int:
        return sum(len(leases) for leases in self._leases.values())

    async def admit(self, owner: str, quota: Quota) -> Admission:
        now = self._clock()
        held = self._leases.get(owner, set())
        decision = decide(
            quota,
            now,
            self._buckets.get((owner, "requests")),
            self._buckets.get((owner, "tokens")),
            len(held),
            self.open_streams,
        )
        self._keep(owner, decision.requests, decision.tokens)
        if decision.refused is not None:
            raise refusal(quota, decision)
        lease = None
        if quota.leases:
            lease = new_id("lease_")
            self._leases.setdefault(owner, set()).add(lease)
        return Admission(owner, quota, lease, rate_headers(quota, decision))

    async def finish(self, admission: Admission, tokens: int) -> None:
        owner, quota = admission.owner, admission.quota
        if admission.lease is not None:
            held = self._leases.get(owner, set())
            held.discard(admission.lease)
            if not held:
                self._leases.pop(owner, None)
        bucket = charge(self._buckets.get((owner, "tokens")), quota.tokens_per_minute, tokens, self._clock())
        self._keep(owner, None, bucket)

    def _keep(self, owner: str, requests: Bucket | None, tokens: Bucket | None) -> None:
        for kind, bucket in (("requests", requests), ("tokens", tokens)):
            if bucket is not None:
                self._buckets[(owner, kind)] = bucket

    async def close(self) -> None:
        self._leases.clear()
