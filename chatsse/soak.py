"""Soak runs: a 4-worker gunicorn chatsse under the mixed traffic of chatsse/traffic.py for
minutes (``make soak``), and the checks that say whether it held up.

One run: start the store (a SQLite file, or a real ``redis-server`` on a free port) and
gunicorn; warm up with the same traffic (the allocator's arenas, the caches, the store's
connection pools reach their working size); let the streams drain and take the *idle* figures
of every worker; send the traffic for ``duration`` seconds; drain again, take the idle figures
again, and read back every turn a client saw complete. It fails when

- a worker's RSS grew more than ``rss_growth_limit`` (10%) from the first idle figures to the
  last;
- a worker's asyncio tasks or open file descriptors are more than a small tolerance above their
  first idle count (:data:`TASK_TOLERANCE`, :data:`FD_TOLERANCE`);
- a worker was replaced (it crashed), or any request ended in a way its kind should not
  (a bad request refused as asked is expected, and counted apart);
- a completed turn is missing from the store (:func:`chatsse.traffic.missing_turns`).

Worker figures come from ``/proc/<pid>`` of gunicorn's children (RSS, file descriptors,
threads) and, for asyncio tasks, which only the worker can see, from the
``chatsse_worker_asyncio_tasks`` gauge each worker sets every second (one sample per live
worker's pid in ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp

from chatsse.processes import GunicornServer, RedisServer
from chatsse.traffic import Mix, Traffic, TrafficRecord, missing_turns

__all__ = [
    "FD_TOLERANCE",
    "QUICK",
    "SERVER_ENV",
    "TASK_TOLERANCE",
    "Check",
    "SoakConfig",
    "StoreUnderTest",
    "WorkerSample",
    "arun_soak",
    "errors_check",
    "event_loop",
    "idle_samples",
    "leak_check",
    "log_digest",
    "log_errors",
    "machine",
    "proc_sample",
    "rss_check",
    "run_soak",
    "sample_workers",
    "served",
    "sqlite_bytes",
    "store_size",
    "summary_text",
    "turns_check",
    "wait_idle",
    "worker_tasks",
    "workers_check",
]

StoreKind = Literal["sqlite", "redis"]
Log = Callable[[str], object]

TASKS_METRIC = "chatsse_worker_asyncio_tasks"
# Idle counts are each worker's minimum over a few samples a second apart, after the streams
# drained. What can still differ between two idle moments without anything leaking: a request
# in flight when the gauge was sampled (the scrape that reads it, a straggling keep-alive
# request: one task each), and a connection of a pool opened at a peak of the traffic (the
# Redis client's pool grows with concurrent store calls; SQLite keeps one connection). A leak
# of one task or one descriptor per thousand requests shows as tens per worker in a soak.
TASK_TOLERANCE = 2
FD_TOLERANCE = 4

# The simulated engine fast enough to push volume (replies of 20-60 tokens, 2 ms apart), no
# eviction and no expiry during a run (every completed turn must stay readable), small
# messages (an oversized one is 4 KiB + 1), and a short drain at the end.
SERVER_ENV = {
    "CHATSSE_SIM_TTFT_MS": "5",
    "CHATSSE_SIM_PREFILL_MS_PER_TOKEN": "0",
    "CHATSSE_SIM_TOKEN_INTERVAL_MS": "2",
    "CHATSSE_SIM_REPLY_TOKENS_MIN": "20",
    "CHATSSE_SIM_REPLY_TOKENS_MAX": "60",
    "CHATSSE_MAX_MESSAGE_SIZE": "4096",
    "CHATSSE_MAX_CONVERSATIONS": "100000000",
    "CHATSSE_CONVERSATION_TTL": "86400",
    "CHATSSE_SHUTDOWN_GRACE_PERIOD": "2",
    "CHATSSE_LOG_LEVEL": "warning",
}


@dataclass(frozen=True)
class SoakConfig:
    duration: float = 600.0  # seconds of traffic after the warm-up
    warmup: float = 30.0
    store: StoreKind = "sqlite"
    workers: int = 4
    concurrency: int = 50
    seed: int = 0
    mix: Mix = field(default_factory=Mix)
    rss_growth_limit: float = 0.10
    task_tolerance: int = TASK_TOLERANCE
    fd_tolerance: int = FD_TOLERANCE
    request_timeout: float = 30.0
    sample_every: float = 60.0  # seconds between two busy samples of the workers (the timeline)
    idle_reads: int = 3  # samples of each worker at rest, 1.1 s apart, of which the minimum counts
    env: dict[str, str] = field(default_factory=lambda: dict(SERVER_ENV))

    @property
    def max_message_size(self) -> int:
        return int(self.env.get("CHATSSE_MAX_MESSAGE_SIZE", "16384"))


QUICK = SoakConfig(duration=5.0, warmup=3.0, concurrency=10, sample_every=2.0, idle_reads=2)
"""A short run for tests and CI: every part of a full one, in about 20 s."""


# --- the workers, seen from outside ---


@dataclass(frozen=True, slots=True)
class WorkerSample:
    pid: int
    rss_kib: int
    fds: int
    threads: int
    tasks: int | None  # asyncio tasks, from the worker's gauge (None: not in /metrics)


def proc_sample(pid: int) -> tuple[int, int, int]:
    """``(VmRSS KiB, open file descriptors, threads)`` of a process (Linux ``/proc``)."""
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return int(status["VmRSS"].split()[0]), fds, int(status["Threads"])


async def worker_tasks(http: aiohttp.ClientSession, url: str) -> dict[int, int]:
    """Each live worker's asyncio tasks, by pid (``chatsse_worker_asyncio_tasks`` in ``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with asyncio.timeout(10), http.get(f"{url}/metrics") as response:
        text = await response.text()
    found: dict[int, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == TASKS_METRIC and "pid" in sample.labels:
                found[int(sample.labels["pid"])] = int(sample.value)
    return found


async def sample_workers(http: aiohttp.ClientSession, url: str, pids: Sequence[int]) -> list[WorkerSample]:
    tasks = await worker_tasks(http, url)
    samples = []
    for pid in pids:
        with contextlib.suppress(OSError):
            rss, fds, threads = proc_sample(pid)
            samples.append(WorkerSample(pid, rss, fds, threads, tasks.get(pid)))
    return samples


async def wait_idle(http: aiohttp.ClientSession, url: str, within: float = 60.0) -> float:
    """Wait until no stream is open on any worker (``/stats``); the seconds it took.
    ``TimeoutError`` if streams are still open after ``within`` seconds."""
    began = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with http.get(f"{url}/stats") as response:
                    if (await response.json())["all_workers"]["open_streams"] == 0:
                        return time.monotonic() - began
            await asyncio.sleep(0.2)


async def idle_samples(
    http: aiohttp.ClientSession, url: str, pids: Sequence[int], *, reads: int = 3, every: float = 1.1
) -> list[WorkerSample]:
    """Each worker at rest: once no stream is open, the minimum tasks, descriptors and threads
    over ``reads`` samples ``every`` seconds apart (longer than the gauge's period), and the
    last RSS."""
    await wait_idle(http, url)
    await asyncio.sleep(every)  # the streams' last store writes, the gauge's next sample
    rounds = []
    for read in range(reads):
        if read:
            await asyncio.sleep(every)
        rounds.append({s.pid: s for s in await sample_workers(http, url, pids)})
    samples = []
    for pid in pids:
        seen = [r[pid] for r in rounds if pid in r]
        if not seen:
            continue
        counted = [s.tasks for s in seen if s.tasks is not None]
        samples.append(
            WorkerSample(
                pid,
                seen[-1].rss_kib,
                min(s.fds for s in seen),
                min(s.threads for s in seen),
                min(counted) if counted else None,
            )
        )
    return samples


# --- the store ---


@dataclass
class StoreUnderTest:
    """The store a run's server uses: a SQLite file, or a ``redis-server`` of its own."""

    kind: StoreKind
    url: str
    path: Path | None = None  # SQLite
    redis: RedisServer | None = None


@contextlib.contextmanager
def served(
    store: StoreKind,
    directory: Path,
    *,
    workers: int = 4,
    env: dict[str, str] | None = None,
    sqlite_dir: Path | None = None,
) -> Iterator[tuple[GunicornServer, StoreUnderTest]]:
    """Start the store (in ``directory``; SQLite in ``sqlite_dir`` when given) and a gunicorn
    of ``workers`` workers on it; stop both at the end."""
    with contextlib.ExitStack() as stack:
        if store == "redis":
            redis = stack.enter_context(RedisServer(directory / "redis"))
            under_test = StoreUnderTest("redis", redis.store_url, redis=redis)
        else:
            path = (sqlite_dir or directory) / "conversations.db"
            under_test = StoreUnderTest("sqlite", f"sqlite:///{path}", path=path)
        server = stack.enter_context(
            GunicornServer(workers=workers, store=under_test.url, env={**SERVER_ENV, **(env or {})})
        )
        yield server, under_test


async def store_size(http: aiohttp.ClientSession, url: str, store: StoreUnderTest) -> dict[str, int]:
    """Conversations held, and the SQLite files' bytes (database, WAL, shared memory) or
    Redis's ``used_memory``."""
    async with asyncio.timeout(30), http.get(f"{url}/conversations", params={"limit": "1"}) as response:
        size = {"conversations": int((await response.json())["total"])}
    if store.path is not None:
        size.update(sqlite_bytes(store.path))
    else:
        from redis.asyncio import Redis

        client = Redis.from_url(store.url)
        try:
            info = await client.info("memory")
            size["redis_used_memory_bytes"] = int(info["used_memory"])
        finally:
            await client.aclose()
    return size


def sqlite_bytes(path: Path) -> dict[str, int]:
    """The sizes of a SQLite database's three files."""
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        file = Path(f"{path}{suffix}")
        sizes[f"sqlite{suffix or '-db'}_bytes"] = file.stat().st_size if file.exists() else 0
    return sizes


# --- the checks ---


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def rss_check(start: Sequence[WorkerSample], end: Sequence[WorkerSample], limit: float) -> Check:
    """No worker's RSS grew more than ``limit`` (a fraction) from ``start`` to ``end``."""
    before = {s.pid: s.rss_kib for s in start}
    growth = {s.pid: s.rss_kib / before[s.pid] - 1 for s in end if s.pid in before}
    worst = max(growth.values(), default=0.0)
    detail = ", ".join(f"{pid}: {g:+.1%}" for pid, g in sorted(growth.items()))
    return Check(
        "rss_growth", bool(growth) and worst <= limit, f"limit {limit:+.0%}; {detail or 'no workers'}"
    )


def leak_check(
    what: Literal["tasks", "fds", "threads"],
    start: Sequence[WorkerSample],
    end: Sequence[WorkerSample],
    tolerance: int,
) -> Check:
    """No worker holds more than ``tolerance`` more of ``what`` at rest at the end than at the start."""
    before: dict[int, int | None] = {s.pid: getattr(s, what) for s in start}
    grown: dict[int, int] = {}
    unknown = []
    for sample in end:
        first, last = before.get(sample.pid), getattr(sample, what)
        if first is None or last is None:
            unknown.append(sample.pid)
        else:
            grown[sample.pid] = last - first
    ok = bool(grown) and not unknown and max(grown.values()) <= tolerance
    detail = ", ".join(f"{pid}: {d:+d}" for pid, d in sorted(grown.items()))
    if unknown:
        detail += f"; not measured: {unknown}"
    return Check(f"{what}_leak", ok, f"tolerance +{tolerance}; {detail or 'no workers'}")


def workers_check(start: Sequence[int], end: Sequence[int]) -> Check:
    """The same workers at the end as at the start: none crashed and was replaced."""
    same = sorted(start) == sorted(end)
    return Check("workers_kept", same, f"start {sorted(start)}, end {sorted(end)}")


def errors_check(record: TrafficRecord) -> Check:
    problems = record.problems()
    total = sum(problems.values())
    detail = "none" if not total else ", ".join(f"{k} x{n}" for k, n in problems.items())
    return Check("unexpected_errors", total == 0, detail)


def turns_check(missing: Sequence[Any], completed: int) -> Check:
    detail = f"{completed} completed turns read back, {len(missing)} missing"
    return Check("completed_turns_stored", not missing and completed > 0, detail)


# --- the run ---


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def _samples_dict(samples: Sequence[WorkerSample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


async def arun_soak(
    config: SoakConfig, server: GunicornServer, store: StoreUnderTest, *, log: Log = print
) -> dict[str, Any]:
    """Warm up, measure at rest, send the traffic, measure at rest again, check (module
    docstring); the report. ``server`` and ``store`` are running (:func:`served`)."""
    url = server.url
    traffic = Traffic(
        url,
        config.mix,
        concurrency=config.concurrency,
        seed=config.seed,
        max_message_size=config.max_message_size,
        request_timeout=config.request_timeout,
    )
    began = time.monotonic()
    load_before = os.getloadavg()
    async with aiohttp.ClientSession() as http:
        start_pids = server.worker_pids()
        log(f"warm-up: {config.warmup:g} s at concurrency {config.concurrency}")
        record = await traffic.run(duration=config.warmup)
        warmup = _phase(record, began)
        idle_start = await idle_samples(http, url, start_pids, reads=config.idle_reads)
        idle_start_at = time.monotonic() - began
        size_start = await store_size(http, url, store)
        log(f"at rest after the warm-up: {_workers_line(idle_start)}; store {size_start}")
        log(f"traffic: {config.duration:g} s")
        timeline: list[dict[str, Any]] = []
        sampler = asyncio.ensure_future(
            _sample_while(http, url, start_pids, config.sample_every, began, timeline, log)
        )
        try:
            main = await traffic.run(duration=config.duration)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        traffic_phase = _phase(main, began)
        record.extend(main)
        drained = await wait_idle(http, url)
        idle_end = await idle_samples(http, url, start_pids, reads=config.idle_reads)
        idle_end_at = time.monotonic() - began
        end_pids = server.worker_pids()
        size_end = await store_size(http, url, store)
        log(f"drained in {drained:.1f} s; at rest: {_workers_line(idle_end)}; store {size_end}")
        checking = time.monotonic()
        missing = await missing_turns(url, record.turns)
        log(f"read back {len(record.turns)} completed turns in {time.monotonic() - checking:.1f} s")
    checks = [
        rss_check(idle_start, idle_end, config.rss_growth_limit),
        leak_check("tasks", idle_start, idle_end, config.task_tolerance),
        leak_check("fds", idle_start, idle_end, config.fd_tolerance),
        workers_check(start_pids, end_pids),
        errors_check(record),
        turns_check(missing, len(record.turns)),
    ]
    return {
        "config": {**asdict(replace(config, env={})), "env": config.env},
        "machine": machine(load_before),
        "store": store.kind,
        "phases": {"warmup": warmup, "traffic": traffic_phase},
        "requests": record.by_kind(),
        "endings": record.endings(),
        "expected_refusals": record.expected_refusals(),
        "unexpected": record.problems(),
        "unexpected_examples": [e.as_dict() for e in record.unexpected()[:20]],
        "workers": {
            "start": _samples_dict(idle_start),
            "end": _samples_dict(idle_end),
            # When each set was taken, seconds after the run began (the timeline's clock).
            "start_at_s": round(idle_start_at, 1),
            "end_at_s": round(idle_end_at, 1),
        },
        "timeline": timeline,
        "store_size": {"start": size_start, "end": size_end},
        "server_log": log_digest(server.logs()),
        "server_log_errors": log_errors(server.logs()),
        "turns": {
            "completed": len(record.turns),
            "missing": [m.as_dict() for m in missing[:50]],
            "missing_count": len(missing),
        },
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
        "seconds": round(time.monotonic() - began, 1),
    }


_LOG_LINE = re.compile(r"\[(warning|error|critical)\s*\] (\S+)")


def log_digest(text: str) -> dict[str, int]:
    """A server log's warning and error lines, counted by level and event (the word after the
    level: chatsse's event name, or the first word of gunicorn's and uvicorn's messages)."""
    found = Counter(f"{level} {event}" for level, event in _LOG_LINE.findall(text))
    return dict(found.most_common())


def log_errors(text: str, limit: int = 5, context: int = 12) -> list[str]:
    """The first ``limit`` error lines of a server log, each with the ``context`` lines after it
    (its traceback)."""
    lines, found = text.splitlines(), []
    for index, line in enumerate(lines):
        if "[error" in line or "[critical" in line:
            found.append("\n".join(lines[index : index + 1 + context])[:3000])
            if len(found) >= limit:
                break
    return found


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Where a run ran: CPUs, Python, and the load averages before and after (a shared machine)."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _phase(record: TrafficRecord, began: float) -> dict[str, Any]:
    seconds = max(record.ended - record.started, 1e-9)
    requests = sum(record.by_kind().values())
    return {
        "began_at_s": round(record.started - began, 1),
        "seconds": round(seconds, 2),
        "requests": requests,
        "requests_per_second": round(requests / seconds, 1),
        "completed_turns": len(record.turns),
        "completed_turns_per_second": round(len(record.turns) / seconds, 1),
    }


def _workers_line(samples: Sequence[WorkerSample]) -> str:
    return "; ".join(
        f"{s.pid}: {_mib(s.rss_kib)} MiB, {s.fds} fds, {s.tasks} tasks, {s.threads} threads" for s in samples
    )


async def _sample_while(
    http: aiohttp.ClientSession,
    url: str,
    pids: Sequence[int],
    every: float,
    began: float,
    timeline: list[dict[str, Any]],
    log: Log,
) -> None:
    """Busy samples of the workers every ``every`` seconds, into ``timeline``."""
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            samples = await sample_workers(http, url, pids)
            at = round(time.monotonic() - began, 1)
            timeline.append({"at_s": at, "workers": _samples_dict(samples)})
            log(f"  {at:7.1f} s  {_workers_line(samples)}")


def event_loop() -> asyncio.Runner:
    """An event loop for the traffic: uvloop's when installed (less client CPU)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_soak(config: SoakConfig, *, log: Log = print) -> dict[str, Any]:
    """A whole soak run in a temporary directory: store, server, :func:`arun_soak`."""
    with tempfile.TemporaryDirectory(prefix="chatsse-soak-") as tmp:
        log(f"starting a {config.workers}-worker gunicorn on {config.store}")
        with (
            served(config.store, Path(tmp), workers=config.workers, env=config.env) as (server, store),
            event_loop() as runner,
        ):
            return runner.run(arun_soak(config, server, store, log=log))


def summary_text(report: dict[str, Any]) -> str:
    """The report for people: throughput, requests, errors, workers, store, checks."""
    lines = []
    phase, host = report["phases"]["traffic"], report["machine"]
    lines.append(
        f"soak on {report['store']}: {phase['seconds']:.0f} s of traffic after "
        f"{report['phases']['warmup']['seconds']:.0f} s of warm-up, concurrency "
        f"{report['config']['concurrency']}, {report['seconds']:.0f} s in all; {host['cpus']} CPUs, load "
        f"average {host['load_average_before'][0]} before, {host['load_average_after'][0]} after"
    )
    lines.append(
        f"traffic: {phase['requests']} requests ({phase['requests_per_second']}/s), "
        f"{phase['completed_turns']} completed turns ({phase['completed_turns_per_second']}/s)"
    )
    lines.append("requests by kind (warm-up included):")
    width = max((len(k) for k in report["requests"]), default=4)
    for kind, count in report["requests"].items():
        endings = ", ".join(f"{e} {n}" for e, n in report["endings"].get(kind, {}).items())
        lines.append(f"  {kind:<{width}}  {count:>7}   {endings}")
    refusals = report["expected_refusals"]
    lines.append(
        f"expected refusals: {sum(refusals.values())} ({', '.join(f'{k} {n}' for k, n in refusals.items())})"
    )
    unexpected = report["unexpected"]
    lines.append(
        f"unexpected errors: {sum(unexpected.values())}" + (f" ({unexpected})" if unexpected else "")
    )
    lines.append("workers at rest   RSS MiB start -> end     fds       tasks     threads")
    end = {w["pid"]: w for w in report["workers"]["end"]}
    for first in report["workers"]["start"]:
        last = end.get(first["pid"], {})
        rss = f"{_mib(first['rss_kib'])} -> {_mib(last['rss_kib']) if last else '?'}"
        fds = f"{first['fds']} -> {last.get('fds', '?')}"
        tasks = f"{first['tasks']} -> {last.get('tasks', '?')}"
        threads = f"{first['threads']} -> {last.get('threads', '?')}"
        lines.append(f"  pid {first['pid']:<8}  {rss:<20}  {fds:<9} {tasks:<9} {threads}")
    sizes = report["store_size"]
    lines.append(f"store at start: {sizes['start']}")
    lines.append(f"store at end:   {sizes['end']}")
    lines.append(
        f"turns: {report['turns']['completed']} completed, {report['turns']['missing_count']} missing"
    )
    lines.append("checks:")
    for check in report["checks"]:
        lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'}  {check['name']:<24} {check['detail']}")
    lines.append("PASSED" if report["ok"] else "FAILED")
    return "\n".join(lines)
