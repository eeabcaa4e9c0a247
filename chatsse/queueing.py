"""Little's law on a load run: the mean number of requests in a system (L) equals their arrival
rate (λ) times their mean time in it (W), whatever the distributions.

λ and W come from the load client's records; L is measured apart from them, by sampling the
server's own gauge of open streams (``/stats``, every worker together) while the run goes on,
each sample held until the next, so each side checks the other. Over a window that begins and
ends with no request in flight (the first send to the last end) the law is exact for the
client's own records: the area under the in-flight count is the sum of the requests' times.
The server's count is of its own streams, from admission to release, and sampled, so it agrees
to within those differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import TracebackType
from typing import TYPE_CHECKING, Self

import httpx

if TYPE_CHECKING:
    from chatsse.loadgen import LoadTestResult

__all__ = ["LittlesLaw", "OpenStreamsSampler", "littles_law"]


class OpenStreamsSampler:
    """The server's open streams (``/stats`` ``all_workers.open_streams``) every ``every``
    seconds, in a task of the running loop::

        async with OpenStreamsSampler(url) as sampler:
            result = await arun_load_test(...)
        sampler.samples  # [(perf_counter time, open streams), ...]
    """

    def __init__(self, url: str, *, every: float = 0.05) -> None:
        if not every > 0:
            raise ValueError(f"every must be positive, got {every}")
        self.url = url
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            next_at = time.perf_counter()
            while True:
                stats = (await client.get("/stats")).json()
                self.samples.append((time.perf_counter(), int(stats["all_workers"]["open_streams"])))
                next_at += self.every
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass(frozen=True, slots=True)
class LittlesLaw:
    """One window of a run, measured both ways."""

    start: float  # the window, on the records' clock (perf_counter)
    end: float
    arrivals: int  # requests sent in the window
    arrival_rate: float  # λ: arrivals / window
    mean_time_in_system: float  # W: mean time from send to end of those requests
    mean_in_system: float  # L: the server's open streams over the window, each sample held until the next
    samples: int

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def predicted(self) -> float:
        """λW: what Little's law says L is."""
        return self.arrival_rate * self.mean_time_in_system

    @property
    def ratio(self) -> float:
        """Measured L over λW (1 when the law and the instruments agree)."""
        return self.mean_in_system / self.predicted if self.predicted > 0 else float("nan")


def _time_average(samples: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """The mean over ``[start, end]`` of the count the samples describe, each held until the next:
    a slow answer (a busy server) then weighs as long as it lasted, not as one sample."""
    points = sorted(samples)
    area = 0.0
    covered = 0.0
    for (at, count), (following, _) in pairwise([*points, (end, 0)]):
        low, high = max(at, start), min(following, end)
        if high > low:
            area += count * (high - low)
            covered += high - low
    return area / covered


def littles_law(
    result: LoadTestResult,
    samples: Sequence[tuple[float, int]],
    *,
    window: tuple[float, float] | None = None,
) -> LittlesLaw:
    """λ, W and L of ``result`` over ``window`` (default: the first send to the last end).
    Requests that never ended are left out; a window cut inside the run counts the requests
    sent in it."""
    ended = [r for r in result.records if r.end is not None]
    if not ended:
        raise ValueError("no request of this run ended")
    start, end = window or (min(r.sent for r in ended), max(r.end for r in ended if r.end is not None))
    if not end > start:
        raise ValueError(f"the window must have a positive length, got {start}..{end}")
    inside = [r for r in ended if start <= r.sent <= end]
    seen = sum(1 for at, _ in samples if start <= at <= end)
    if not inside or not seen:
        raise ValueError("no request or no sample in the window")
    times = [r.end - r.sent for r in inside if r.end is not None]
    return LittlesLaw(
        start=start,
        end=end,
        arrivals=len(inside),
        arrival_rate=len(inside) / (end - start),
        mean_time_in_system=sum(times) / len(times),
        mean_in_system=_time_average(samples, start, end),
        samples=seen,
    )
