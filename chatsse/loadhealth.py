"""The load client's self-check: was the client itself the bottleneck of a run?

Every token's arrival is stamped when the client's event loop gets to the bytes, so a busy
client adds its own delays to the latencies it reports (and merges tokens into fewer,
later reads). Each client process measures two things over its run:

- **Event-loop lag**: a ticker asks to wake every ``TICK`` seconds (absolute deadlines on
  the monotonic clock) and records how late it woke. The lag is what any read or send of
  that moment waited on top of its own work. Kept in a fixed log-scale histogram (2%
  buckets), so memory stays bounded however long the run; ``max`` is exact.
- **CPU share**: ``time.process_time()`` (all the process's threads) over wall time. The
  loop is one thread: near a whole core, every event queues behind the others.

:func:`saturation_warnings` flags a process whose loop lag p99 reached
``LAG_P99_LIMIT`` (20 ms) or whose CPU share reached ``CPU_SHARE_LIMIT`` (0.9 of a core).
Why these: 20 ms is a whole gap between tokens of a fast server (50 tokens/s), so a
client that late on 1% of its wake-ups blurs the ITL it reports, while an idle client
stays well below it (about 5 ms at p99 on a shared 2-core machine at load average 15;
libuv's timers alone count whole milliseconds); a single-threaded loop above 90% busy is
in the steep part of a queue's curve, where waiting grows as 1 / (1 - busy). A lone long
stall (a garbage collection, a page fault) shows in ``max`` without tripping the p99,
but in a run shorter than a second (under 100 ticks) the p99 is the max.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from time import perf_counter
from typing import Any

__all__ = [
    "CPU_SHARE_LIMIT",
    "LAG_P99_LIMIT",
    "TICK",
    "ClientProcess",
    "LagHistogram",
    "LoopWatch",
    "saturation_warnings",
]

TICK = 0.01  # seconds between the ticker's wake-ups
LAG_P99_LIMIT = 0.020  # seconds
CPU_SHARE_LIMIT = 0.9  # of one core

_FLOOR = 1e-5  # lags below 10 us share the first bucket
_GROWTH = 1.02  # each bucket 2% wider than the one before
_BUCKETS = 1024  # up to 10 us * 1.02^1023, about 6e3 s
_LOG_GROWTH = math.log(_GROWTH)


class LagHistogram:
    """Counts of lags in log-spaced buckets; quantiles are read at a bucket's upper edge."""

    __slots__ = ("count", "counts", "max")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.max = 0.0

    def add(self, lag: float) -> None:
        if lag > self.max:
            self.max = lag
        index = 0 if lag <= _FLOOR else min(int(math.log(lag / _FLOOR) / _LOG_GROWTH) + 1, _BUCKETS - 1)
        self.counts[index] += 1
        self.count += 1

    def quantile(self, q: float) -> float:
        """The smallest bucket edge with at least ``q`` of the samples at or below it (capped
        at the exact max); 0 with no samples."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        if self.count == 0:
            return 0.0
        rank = math.ceil(q * self.count)
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                if index == _BUCKETS - 1:  # the last bucket has no upper edge
                    return self.max
                return min(_FLOOR * _GROWTH**index, self.max)
        return self.max


class LoopWatch:
    """The ticker and CPU clock of one process's run: ``start()``, then ``stop()`` at the end."""

    def __init__(self, *, tick: float = TICK) -> None:
        self.tick = tick
        self.lag = LagHistogram()
        self._task: asyncio.Task[None] | None = None
        self._wall = 0.0
        self._cpu = 0.0

    def start(self) -> None:
        self._wall, self._cpu = perf_counter(), time.process_time()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        tick, add = self.tick, self.lag.add
        deadline = perf_counter() + tick
        while True:
            await asyncio.sleep(deadline - perf_counter())
            now = perf_counter()
            if now < deadline:  # woken early (uvloop rounds timers): not lag, wait the rest
                continue
            add(now - deadline)
            deadline += tick
            if deadline < now:  # after a stall, count it once, not once per missed tick
                deadline = now + tick

    async def stop(self, index: int = 0) -> ClientProcess:
        """Stop the ticker; what this process saw since ``start()``."""
        wall, cpu = perf_counter() - self._wall, time.process_time() - self._cpu
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return ClientProcess(
            index=index,
            pid=os.getpid(),
            wall_seconds=wall,
            cpu_seconds=cpu,
            loop_lag_p99=self.lag.quantile(0.99),
            loop_lag_max=self.lag.max,
            ticks=self.lag.count,
        )


@dataclass(frozen=True, slots=True)
class ClientProcess:
    """One client process's load over a run: its CPU time and its event loop's lag (s)."""

    index: int
    pid: int
    wall_seconds: float
    cpu_seconds: float
    loop_lag_p99: float
    loop_lag_max: float
    ticks: int

    @property
    def cpu_share(self) -> float:
        """CPU seconds per wall second: 1.0 is one whole core."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_share": self.cpu_share}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientProcess:
        return cls(**{k: v for k, v in data.items() if k != "cpu_share"})


def saturation_warnings(
    processes: Sequence[ClientProcess],
    *,
    lag_limit: float = LAG_P99_LIMIT,
    cpu_limit: float = CPU_SHARE_LIMIT,
) -> list[str]:
    """One line per limit a client process reached; empty when the client kept up."""
    warnings = []
    for p in processes:
        name = f"client process {p.index}" if len(processes) > 1 else "the client"
        if p.loop_lag_p99 >= lag_limit:
            warnings.append(
                f"{name}'s event loop woke {p.loop_lag_p99 * 1000:.1f} ms late at p99 "
                f"(limit {lag_limit * 1000:g} ms, max {p.loop_lag_max * 1000:.1f} ms)"
            )
        if p.cpu_share >= cpu_limit:
            warnings.append(f"{name} used {p.cpu_share:.0%} of a core (limit {cpu_limit:.0%})")
    return warnings
