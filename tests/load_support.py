"""Helpers for the load client's tests: targets that misbehave on purpose, in a module of
their own so that the worker processes of a split run (``processes > 1``) can import them,
and what a run's records say about it."""

from __future__ import annotations

import time
from typing import Any

from chatsse.loadmetrics import RequestRecord
from chatsse.loadtargets import ChatsseTarget


def max_in_flight(records: list[RequestRecord]) -> int:
    """The most requests that were open at once."""
    moments = sorted([(r.sent, 1) for r in records] + [(r.end or r.sent, -1) for r in records])
    level = peak = 0
    for _, step in moments:
        level += step
        peak = max(peak, level)
    return peak


class BrokenTarget(ChatsseTarget):
    """Every request raises: a bug in a target."""

    async def request(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug in a target")


class BlockingTarget(ChatsseTarget):
    """Blocks the client's event loop for ``block`` seconds before each request, as a
    client with too much work per request would."""

    block = 0.1

    async def request(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.block)  # noqa: ASYNC251 - the point: the event loop stalls
        await super().request(*args, **kwargs)
