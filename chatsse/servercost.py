"""What a streaming server costs, measured from outside over real sockets: the server process's
CPU time around a load run (per event, per request) and the asyncio tasks each open stream
holds. ``scripts/bench_*.py`` and the workbook measure servers with it.

CPU is read from the kernel's per-process clock (:func:`cpu_seconds`), so a figure is the
server's own work, whatever the load client cost; divide it by what the client counted (events
received, requests completed). Runs on a shared machine are noisy: compare servers measured in
one session (ratios), not absolute figures between sessions.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from chatsse.eventstream import EventStreamParser
from chatsse.loadgen import LoadConfig, LoadTestResult, arun_load_test
from chatsse.loadtargets import ChatsseTarget, Target

__all__ = [
    "MeasuredServer",
    "cpu_per_event_steady",
    "cpu_per_request",
    "cpu_seconds",
    "measured_run",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None, use_errno=True)


class MeasuredServer(Protocol):
    """A server in a process of its own: where it listens and the CPU time it has used."""

    @property
    def url(self) -> str: ...

    def cpu(self) -> float: ...


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads), in nanoseconds' resolution: the kernel's
    per-process CPU clock (``clock_getcpuclockid``), not /proc's utime + stime, which count
    in clock ticks (10 ms): a short window of a cheap server could read 0 or 1 tick."""
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return time.clock_gettime(clock.value)


async def measured_run(
    server: MeasuredServer, config: LoadConfig, max_tokens: int, target: Target | None = None
) -> tuple[LoadTestResult, float, float]:
    """A load test (chatsse's ``/chat`` unless another target is given); returns it with the
    server's and this process's CPU seconds during it."""
    target = target or ChatsseTarget(server.url, max_tokens=max_tokens)
    server_before, client_before = server.cpu(), time.process_time()
    result = await arun_load_test(target, config)
    return result, server.cpu() - server_before, time.process_time() - client_before


async def cpu_per_request(
    server: MeasuredServer, *, requests: int, tokens: int, concurrency: int
) -> dict[str, Any]:
    """Server CPU per request of ``tokens`` tokens (``tokens`` + 2 events), in a closed loop of
    ``concurrency`` users, after a warm-up of a tenth as many requests."""
    warm = LoadConfig(requests=max(8, requests // 10), concurrency=concurrency, timeout=60)
    await arun_load_test(ChatsseTarget(server.url, max_tokens=tokens), warm)
    config = LoadConfig(requests=requests, concurrency=concurrency, timeout=60)
    result, server_cpu, client_cpu = await measured_run(server, config, tokens)
    done = len(result.records)
    return {
        "requests": done,
        "events_per_request": sum(r.events for r in result.records) / done,
        "server_cpu_s": server_cpu,
        "server_us_per_request": 1e6 * server_cpu / done,
        "client_us_per_request": 1e6 * client_cpu / done,
        "requests_per_s": result.summary().request_throughput,
        "errors": result.summary().errors_by_type,
    }


async def cpu_per_event_steady(
    server: MeasuredServer,
    *,
    streams: int,
    window: float,
    path: str = "/chat",
    body: dict[str, Any] | None = None,
    count_tasks: Callable[[], Awaitable[int]] | None = None,
) -> dict[str, Any]:
    """Server CPU per event while ``streams`` streams are all mid-reply, tokens paced by the
    server: the regime of a chat server. Counted over ``window`` seconds that start after
    every stream has its first token (and a fifth of the window more), so no per-request work
    is included; the replies must outlast the window. Every event of the window is a token's
    (``message`` events; an OpenAI stream's data lines have no ``event:`` and parse as
    ``message`` too).

    ``count_tasks``: how to read the server's asyncio tasks; then ``tasks_per_stream`` is
    (tasks with every stream open - tasks before the first) / ``streams``, read before the
    window so the reading costs the window nothing."""
    events = 0
    started = 0
    body = body or {"message": "a steady stream"}
    idle = None if count_tasks is None else await count_tasks()
    busy = None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def read_stream() -> None:
            nonlocal events, started
            parser = EventStreamParser()
            first = True
            async with http.post(server.url + path, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{server.url}: HTTP {response.status} opening a stream")
                async for chunk in response.content.iter_any():
                    got = sum(1 for event in parser.feed(chunk) if event.event == "message")
                    events += got
                    if got and first:
                        started, first = started + 1, False

        readers = [asyncio.create_task(read_stream()) for _ in range(streams)]
        try:
            deadline = time.monotonic() + 60
            while started < streams:
                for reader in readers:
                    if reader.done():
                        reader.result()  # raises what ended it early
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.url}: only {started} of {streams} streams started")
                await asyncio.sleep(0.05)
            await asyncio.sleep(window / 5)
            if count_tasks is not None:
                busy = await count_tasks()
            cpu_before, events_before, wall_before = server.cpu(), events, time.perf_counter()
            await asyncio.sleep(window)
            cpu_after, events_after, wall_after = server.cpu(), events, time.perf_counter()
            if any(reader.done() for reader in readers):
                raise RuntimeError(f"{server.url}: a stream ended inside the measuring window")
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    counted = events_after - events_before
    wall = wall_after - wall_before
    row: dict[str, Any] = {
        "streams": streams,
        "events": counted,
        "events_per_s": counted / wall,
        "server_cpu_share": (cpu_after - cpu_before) / wall,
        "server_us_per_event": 1e6 * (cpu_after - cpu_before) / counted,
    }
    if idle is not None and busy is not None:
        row.update(tasks_idle=idle, tasks_busy=busy, tasks_per_stream=(busy - idle) / streams)
    return row
