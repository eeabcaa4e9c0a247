"""Load shapes: who sends which request when, and the results of a run.

- **Closed loop** (``rate=None``): ``concurrency`` users, each sending its next request
  as soon as its previous one ended (after ``think_time`` between the turns of a
  conversation). With ``ramp_up``, user ``i`` starts at ``ramp_up * i / concurrency``.
- **Open loop** (``rate`` set): new users arrive at ``rate`` per second, whatever the
  server's speed. Arrival offsets are drawn in advance from a seeded generator
  (:func:`arrival_times`) and each is awaited as an absolute deadline on the monotonic
  clock, so a slow loop does not drift. ``max_concurrency`` caps requests in flight: a
  request waits for a slot, and its lateness (``sent - intended_start``) shows the wait.
  With ``ramp_up``, the rate grows linearly from 0 over that many seconds.
- **Multi-turn users** (``turns`` > 1): each user holds one conversation of ``turns``
  turns, ``think_time`` seconds apart (from the end of one reply to the next send, which
  is that turn's intended start). A turn with nothing to wait for is due when it asks
  for a slot, so a slot wait is recorded for every turn (``RequestRecord.slot_wait``).
- **Client processes** (``processes`` > 1): the run is split over that many worker
  processes (:mod:`chatsse.loadworkers` says how) and merged into one result;
  ``processes=1`` runs in this process and event loop.

Every run is bounded by ``requests`` (turns sent) and/or ``duration``. At the end of
``duration`` no new request is sent; requests in flight get ``drain_timeout`` seconds,
then are cancelled and recorded as ``cancelled``. Cancelling a run (Ctrl-C in a script,
an interrupt or a timeout in a notebook) stops it the same way and returns what was
recorded so far, with ``interrupted=True``.

All times are ``time.perf_counter()`` seconds, the clock the records use. Every run
measures its own client (:mod:`chatsse.loadhealth`): event-loop lag and CPU share per
process, in ``LoadTestResult.client``.

The client's garbage collector is paused while a run is in flight (:func:`_gc_paused`):
with thousands of open streams a collection stops the event loop for tens of
milliseconds, which the records would show as server latency. The client makes almost no
reference cycles (tens of objects per thousands of requests), so nothing piles up.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp

from chatsse.loadhealth import ClientProcess, LoopWatch, saturation_warnings
from chatsse.loadmetrics import SLO, RequestRecord, Summary, summarize
from chatsse.loadtargets import Conversation, Target, TextCallback
from chatsse.vllmresults import save_vllm_results, vllm_result

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Arrival",
    "IdSource",
    "Ids",
    "LoadConfig",
    "LoadTest",
    "LoadTestResult",
    "Progress",
    "RunPart",
    "Share",
    "arrival_times",
    "arun_load_test",
    "arun_single_request",
    "arun_sweep",
    "load_results",
    "run_load_test",
    "run_single_request",
    "run_sweep",
    "runner",
    "save_sweep",
    "split_run",
    "sweep_configs",
]

Arrival = Literal["poisson", "gamma", "constant"]
ARRIVALS: tuple[Arrival, ...] = ("poisson", "gamma", "constant")
RESULT_FORMAT = "chatsse-load-result/1"

DEFAULT_MESSAGES = (
    "How do server-sent events work?",
    "Why does tail latency matter more than the average?",
    "What happens to a stream when the client disconnects?",
    "How should I pick the number of workers?",
    "What is the difference between TTFT and inter-token latency?",
)


def arrival_times(
    rate: float,
    *,
    count: int | None = None,
    horizon: float | None = None,
    arrival: Arrival = "poisson",
    burstiness: float = 1.0,
    ramp_up: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Arrival offsets in seconds from the start: the first at 0, at most ``count``, all
    before ``horizon``.

    Gaps follow vLLM's ``benchmark_serving``: Poisson (exponential gaps), gamma with
    shape ``burstiness`` and scale ``1 / (rate * burstiness)`` (below 1 burstier than
    Poisson, above 1 more even), or constant ``1 / rate``. A ramp-up raises the rate
    linearly from 0 to ``rate`` over ``ramp_up`` seconds: gaps are drawn at unit rate
    and mapped through the inverse of the cumulative rate (a time change, which keeps
    the process's shape). ``rate=inf`` sends all ``count`` at once.
    """
    if count is None and horizon is None:
        raise ValueError("arrival_times needs a count or a horizon")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        if count is None:
            raise ValueError("an infinite rate needs a count")
        return [0.0] * count if horizon is None or horizon > 0 else []
    rng = random.Random(seed)
    # Cumulative rate L(t) = rate * t^2 / (2R) during the ramp, then linear.
    ramp_work = rate * ramp_up / 2

    def at(work: float) -> float:
        if work < ramp_work:
            return math.sqrt(2 * ramp_up * work / rate)
        return ramp_up + (work - ramp_work) / rate

    times: list[float] = []
    work = 0.0
    limit = math.inf if horizon is None else horizon
    while count is None or len(times) < count:
        t = at(work)
        if t >= limit:
            break
        times.append(t)
        if arrival == "constant":
            work += 1.0
        elif arrival == "poisson":
            work += rng.expovariate(1.0)
        elif arrival == "gamma":
            work += rng.gammavariate(burstiness, 1.0 / burstiness)
        else:
            raise ValueError(f"unknown arrival process {arrival!r}; expected one of {ARRIVALS}")
    return times


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """The shape and bounds of one run (see the module docstring).

    ``requests`` counts turns; ``timeout`` bounds each request (``None``: no limit);
    ``max_concurrency`` caps requests in flight in either loop; ``seed`` fixes the
    arrival times; request ``k`` sends ``messages[k % len(messages)]``; ``slo`` is the
    default for :meth:`LoadTestResult.summary`; ``processes`` is the number of client
    processes (1: this one; see :mod:`chatsse.loadworkers`).
    """

    requests: int | None = None
    duration: float | None = None
    concurrency: int = 1
    rate: float | None = None
    arrival: Arrival = "poisson"
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ramp_up: float = 0.0
    turns: int = 1
    think_time: float = 0.0
    timeout: float | None = 300.0
    drain_timeout: float = 10.0
    seed: int = 0
    messages: tuple[str, ...] = DEFAULT_MESSAGES
    slo: SLO | None = None
    processes: int = 1

    def __post_init__(self) -> None:
        if self.requests is None and self.duration is None:
            raise ValueError("a run needs a bound: requests, duration or both")
        checks = [
            (self.requests is None or self.requests >= 1, "requests must be at least 1"),
            (self.duration is None or self.duration > 0, "duration must be positive"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            (self.rate is None or self.rate > 0, "rate must be positive"),
            (
                self.rate is None or math.isfinite(self.rate) or self.requests is not None,
                "an infinite rate needs a request count",
            ),
            (self.arrival in ARRIVALS, f"arrival must be one of {ARRIVALS}"),
            (self.burstiness > 0, "burstiness must be positive"),
            (self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency must be >= 1"),
            (self.ramp_up >= 0, "ramp_up must not be negative"),
            (self.turns >= 1, "turns must be at least 1"),
            (self.think_time >= 0, "think_time must not be negative"),
            (self.timeout is None or self.timeout > 0, "timeout must be positive"),
            (self.drain_timeout >= 0, "drain_timeout must not be negative"),
            (len(self.messages) >= 1, "messages must not be empty"),
            (self.processes >= 1, "processes must be at least 1"),
            (
                self.rate is not None or self.concurrency >= self.processes,
                "a closed loop needs at least one user per process: concurrency >= processes",
            ),
            (
                self.max_concurrency is None or self.max_concurrency >= self.processes,
                "max_concurrency is split over the processes: it must be >= processes",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def label(self) -> str:
        """A short name for plots and tables: the load level."""
        if self.rate is not None:
            return f"rate {self.rate:g}/s"
        return f"concurrency {self.concurrency}"

    def describe(self) -> str:
        """One line: shape, users, bounds."""
        if self.rate is not None:
            parts = [f"open loop, {self.rate:g} users/s, {self.arrival} arrivals"]
            if self.arrival == "gamma":
                parts[0] += f" (burstiness {self.burstiness:g})"
            if self.max_concurrency is not None:
                parts.append(f"max concurrency {self.max_concurrency}")
        else:
            parts = [f"closed loop, {self.concurrency} users"]
        if self.ramp_up:
            parts.append(f"ramp-up {self.ramp_up:g} s")
        if self.turns > 1:
            parts.append(f"{self.turns} turns per user, think time {self.think_time:g} s")
        bounds = []
        if self.requests is not None:
            bounds.append(f"{self.requests} requests")
        if self.duration is not None:
            bounds.append(f"{self.duration:g} s")
        parts.append("until " + " or ".join(bounds))
        if self.processes > 1:
            parts.append(f"{self.processes} client processes")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "messages" in values:
            values["messages"] = tuple(values["messages"])
        if values.get("slo") is not None:
            values["slo"] = SLO(**values["slo"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Share:
    """What one client process sends: its open-loop arrivals (offsets from the start), or
    its closed-loop users (indices among ``concurrency``), and its concurrency slots."""

    index: int
    arrivals: tuple[float, ...]
    users: tuple[int, ...]
    max_concurrency: int | None


def split_run(config: LoadConfig) -> list[Share]:
    """The run's plan, dealt out over ``config.processes`` processes.

    Arrival ``i`` of the seeded schedule (drawn once, here) and closed-loop user ``i`` go
    to process ``i % processes``; ``max_concurrency`` is split exactly (the first
    ``max_concurrency % processes`` processes get one slot more).
    """
    n = config.processes
    arrivals: list[float] = []
    if config.rate is not None:
        arrivals = arrival_times(
            config.rate,
            count=None if config.requests is None else math.ceil(config.requests / config.turns),
            horizon=config.duration,
            arrival=config.arrival,
            burstiness=config.burstiness,
            ramp_up=config.ramp_up,
            seed=config.seed,
        )
    users = range(config.concurrency) if config.rate is None else range(0)
    cap = config.max_concurrency
    return [
        Share(
            index=k,
            arrivals=tuple(arrivals[k::n]),
            users=tuple(users[k::n]),
            max_concurrency=None if cap is None else cap // n + (1 if k < cap % n else 0),
        )
        for k in range(n)
    ]


class IdSource(Protocol):
    """Hands out ids 0, 1, 2, ... over the whole run (every process of it)."""

    def take(self) -> int | None:
        """The next id, or None once ``limit`` ids were handed out."""

    @property
    def exhausted(self) -> bool: ...


class Ids:
    """An :class:`IdSource` for one process: a counter with an optional limit."""

    __slots__ = ("limit", "next")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.next = 0

    def take(self) -> int | None:
        if self.limit is not None and self.next >= self.limit:
            return None
        self.next += 1
        return self.next - 1

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.next >= self.limit


async def _start_now(target: dict[str, Any]) -> float:
    return perf_counter()


@dataclass(frozen=True, slots=True)
class RunPart:
    """One process's part of a run: its share of the plan, the run-wide ids (request ids
    count turns, so their limit is ``requests``), and ``start``, awaited with the prepared
    target's description, which returns the run's common start time."""

    share: Share
    request_ids: IdSource
    user_ids: IdSource
    start: Callable[[dict[str, Any]], Awaitable[float]] = _start_now

    @classmethod
    def whole(cls, config: LoadConfig) -> RunPart:
        """The whole run in this process."""
        (share,) = split_run(replace(config, processes=1))
        return cls(share, Ids(config.requests), Ids())


_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))

DATAFRAME_COLUMNS = (
    "request_id", "user_id", "turn", "intended_start", "sent", "headers_at", "first_token_at", "end",
    "ttft", "tpot", "e2e", "e2e_intended", "lateness", "slot_wait", "itl_max", "events", "tokens",
    "prompt_tokens", "bytes_received", "status", "error", "ok",
)  # fmt: skip


@dataclass(slots=True)
class LoadTestResult:
    """One run: its configuration, the target, every request's record, and when it ran.

    ``start``/``end`` are on the records' clock (``perf_counter``); ``wall_start`` is the
    Unix time of ``start``. ``unsent`` counts requests that were due before the end of
    ``duration`` but still waited for a ``max_concurrency`` slot when sending stopped.
    ``client`` holds each client process's self-check (:mod:`chatsse.loadhealth`).
    """

    config: LoadConfig
    target: dict[str, Any]
    records: list[RequestRecord]
    start: float
    end: float
    wall_start: float
    interrupted: bool = False
    unsent: int = 0
    client: tuple[ClientProcess, ...] = ()

    @property
    def duration(self) -> float:
        """The whole run, drain included."""
        return self.end - self.start

    @property
    def window(self) -> float:
        """The sending window the rates divide by: from the start to the end of the
        ``duration`` bound, or to the run's end if that came first (see
        :mod:`chatsse.loadmetrics`)."""
        if self.config.duration is None:
            return self.duration
        return min(self.end, self.start + self.config.duration) - self.start

    def client_warnings(self) -> list[str]:
        """Why the client itself may have been the bottleneck; empty when it kept up."""
        return saturation_warnings(self.client)

    @property
    def error_rate(self) -> float:
        """Failed requests / requests (0 when none were sent)."""
        if not self.records:
            return 0.0
        return sum(1 for r in self.records if not r.ok) / len(self.records)

    def summary(self, slo: SLO | None = None) -> Summary:
        """Metrics of the run; ``slo`` defaults to the configuration's."""
        window = self.window
        return summarize(
            self.records,
            duration=max(window, 1e-9),
            slo=slo if slo is not None else self.config.slo,
            until=self.start + window,
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per request; times in seconds since the run's start, latencies in seconds."""
        import pandas as pd

        t0 = self.start

        def since(t: float | None) -> float:
            return math.nan if t is None else t - t0

        def value(v: float | None) -> float:
            return math.nan if v is None else v

        rows = [
            {
                "request_id": r.request_id,
                "user_id": r.user_id,
                "turn": r.turn,
                "intended_start": since(r.intended_start),
                "sent": since(r.sent),
                "headers_at": since(r.headers_at),
                "first_token_at": since(r.first_token_at),
                "end": since(r.end),
                "ttft": value(r.ttft),
                "tpot": value(r.tpot),
                "e2e": value(r.e2e),
                "e2e_intended": value(r.e2e_intended),
                "lateness": r.lateness,
                "slot_wait": r.slot_wait,
                "itl_max": max(r.itls, default=math.nan),
                "events": r.events,
                "tokens": r.tokens,
                "prompt_tokens": r.prompt_tokens,
                "bytes_received": r.bytes_received,
                "status": r.status,
                "error": r.error,
                "ok": r.ok,
            }
            for r in self.records
        ]
        frame = pd.DataFrame(rows, columns=list(DATAFRAME_COLUMNS))
        return frame.astype({"status": "Int64", "prompt_tokens": "Int64"})

    def to_dict(self) -> dict[str, Any]:
        """The saved form: vLLM-like summary keys, the configuration, per-request arrays."""
        summary = self.summary().as_dict()
        summary["errors_by_type"] = summary.pop("errors")
        records = self.records
        return {
            "format": RESULT_FORMAT,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.wall_start)),
            "target": self.target,
            "config": self.config.to_dict(),
            "label": self.config.label,
            "start": self.start,
            "end": self.end,
            "wall_start": self.wall_start,
            "interrupted": self.interrupted,
            "unsent": self.unsent,
            "client": [c.to_dict() for c in self.client],
            **summary,
            "ttfts": [r.ttft for r in records],
            "itls": [r.itls for r in records],
            "input_lens": [r.prompt_tokens for r in records],
            "output_lens": [r.tokens for r in records],
            "errors": [r.error or "" for r in records],
            "requests": {name: [getattr(r, name) for r in records] for name in _RECORD_FIELDS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadTestResult:
        if data.get("format") != RESULT_FORMAT:
            raise ValueError(f"not a {RESULT_FORMAT} file (format {data.get('format')!r})")
        columns = data["requests"]
        count = len(columns["request_id"])
        present = [name for name in _RECORD_FIELDS if name in columns]  # older files lack newer fields
        records = [RequestRecord(**{name: columns[name][i] for name in present}) for i in range(count)]
        return cls(
            config=LoadConfig.from_dict(data["config"]),
            target=data["target"],
            records=records,
            start=data["start"],
            end=data["end"],
            wall_start=data["wall_start"],
            interrupted=data["interrupted"],
            unsent=data["unsent"],
            client=tuple(ClientProcess.from_dict(c) for c in data.get("client", ())),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> LoadTestResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_vllm_dict(self, slo: SLO | None = None) -> dict[str, Any]:
        """The run in the layout of ``vllm bench serve --save-result --save-detailed``
        (:mod:`chatsse.vllmresults`)."""
        return vllm_result(self, slo)

    def save_detailed(self, path: str | Path, slo: SLO | None = None) -> None:
        """Write :meth:`to_vllm_dict` as JSON, to compare with ``vllm bench serve`` output."""
        save_vllm_results([self], path, slo)


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a run, for progress displays."""

    elapsed: float
    sent: int
    completed: int
    failed: int
    open_streams: int
    finished: bool = False

    @property
    def request_rate(self) -> float:
        """Requests finished per second, since the start."""
        return (self.completed + self.failed) / self.elapsed if self.elapsed > 0 else 0.0


ProgressCallback = Callable[[Progress], object]


_gc_pauses = 0  # runs in flight in this process (notebooks may run several at once)
_gc_was_enabled = True


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Disable automatic garbage collection until the last overlapping run ends."""
    global _gc_pauses, _gc_was_enabled
    if _gc_pauses == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_pauses += 1
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_was_enabled:
            gc.enable()


async def _sleep_until(deadline: float) -> None:
    # Event loops may wake a timer early (uvloop rounds to whole milliseconds): sleep
    # again until the deadline has really passed, so no send is ahead of its schedule.
    while (delay := deadline - perf_counter()) > 0:  # noqa: ASYNC110 - waiting for a time, not an event
        await asyncio.sleep(delay)


@dataclass(slots=True)
class _Counters:
    completed: int = 0
    failed: int = 0
    open_streams: int = 0
    unsent: int = 0


class LoadTest:
    """One run of ``config`` against ``target``: ``result = await LoadTest(target, config).run()``.

    It runs in this process and event loop (``config.processes`` is for
    :func:`arun_load_test`); a worker process passes its ``part`` of a split run.
    ``records`` fills as requests are sent, so it can be read during the run.
    """

    def __init__(
        self,
        target: Target,
        config: LoadConfig,
        *,
        progress: ProgressCallback | None = None,
        progress_interval: float = 0.25,
        part: RunPart | None = None,
    ) -> None:
        self.target = target
        self.config = config
        self.progress = progress
        self.progress_interval = progress_interval
        self.part = part if part is not None else RunPart.whole(config)
        self.records: list[RequestRecord] = []
        self.start = 0.0
        self._started = False
        self._counters = _Counters()
        self._stop_at = math.inf
        self._cap: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._crash: BaseException | None = None
        self._driving: asyncio.Task[Any] | None = None

    def snapshot(self, *, finished: bool = False) -> Progress:
        c = self._counters
        return Progress(
            elapsed=perf_counter() - self.start,
            sent=len(self.records),
            completed=c.completed,
            failed=c.failed,
            open_streams=c.open_streams,
            finished=finished,
        )

    async def run(self) -> LoadTestResult:
        """Run to the end of the configured bounds; on cancellation return what was recorded."""
        if self._started:
            raise RuntimeError("a LoadTest runs once")
        self._started = True
        cfg, part = self.config, self.part
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        ) as http:
            await self.target.prepare(http)
            if part.share.max_concurrency is not None:
                self._cap = asyncio.Semaphore(part.share.max_concurrency)
            self.start = await part.start(self.target.describe())
            await _sleep_until(self.start)
            wall_start = time.time() - (perf_counter() - self.start)
            self._stop_at = math.inf if cfg.duration is None else self.start + cfg.duration
            watch = LoopWatch()
            watch.start()
            reporter = None if self.progress is None else asyncio.create_task(self._report(self.progress))
            with _gc_paused():
                interrupted = await self._drive(http)
            end = perf_counter()
            client = await watch.stop(part.share.index)
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
        if self.progress is not None:
            self.progress(self.snapshot(finished=True))
        if self._crash is not None:
            raise self._crash
        return LoadTestResult(
            config=cfg,
            target=self.target.describe(),
            records=self.records,
            start=self.start,
            end=end,
            wall_start=wall_start,
            interrupted=interrupted,
            unsent=self._counters.unsent,
            client=(client,),
        )

    def stop(self) -> None:
        """End the run now, as cancelling it would, keeping its records (from the run's
        loop; a worker process's answer to its parent). Does nothing outside sending and
        the drain."""
        if self._driving is not None:
            self._driving.cancel()

    async def _drive(self, http: aiohttp.ClientSession) -> bool:
        """Start the users and wait for the end; True when the run was cancelled."""
        share = self.part.share
        self._driving = asyncio.current_task()
        interrupted = False
        try:
            try:
                if self.config.rate is not None:
                    self._spawn(self._open_loop(http, share.arrivals))
                else:
                    for slot in share.users:
                        self._spawn(self._closed_user(http, slot))
                if self._tasks:  # else nothing for this process to send
                    await self._wait_for_end()
            except asyncio.CancelledError:
                if self._driving is not None:
                    self._driving.uncancel()  # handled here: the run ends and returns its records
                interrupted = True
            finally:
                self._driving = None  # a stop() from now on would cancel the teardown
        finally:
            await self._cancel_all()
        return interrupted

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and self._crash is None:
            self._crash = task.exception()
            if self._crash is not None:
                self._idle.set()
        if not self._tasks:
            self._idle.set()

    async def _wait_for_end(self) -> None:
        drain_deadline = self._stop_at + self.config.drain_timeout
        # As in _sleep_until: a timer may fire early, so the drain is never cut short.
        while not self._idle.is_set():
            timeout = None if math.isinf(drain_deadline) else drain_deadline - perf_counter()
            if timeout is not None and timeout <= 0:
                return
            with suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    async def _cancel_all(self) -> None:
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _report(self, callback: ProgressCallback) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            callback(self.snapshot())

    def _new_user_id(self) -> int:
        if self.config.turns == 1:
            return 0
        user_id = self.part.user_ids.take()
        assert user_id is not None  # user ids have no limit
        return user_id

    async def _slot(self, cap: asyncio.Semaphore) -> tuple[float, float]:
        """Take a concurrency slot: (when it was asked for, when it was acquired)."""
        if not cap.locked():
            await cap.acquire()  # free: returns at once, without a clock read for the wait
            now = perf_counter()
            return now, now
        asked = perf_counter()
        try:
            await cap.acquire()
        except asyncio.CancelledError:
            self._counters.unsent += 1
            raise
        return asked, perf_counter()

    async def _send(
        self,
        http: aiohttp.ClientSession,
        conversation: Conversation,
        user_id: int,
        turn: int,
        intended: float | None,
    ) -> RequestRecord | None:
        """Send one turn when a slot is free; ``None`` once the run sends no more.

        A turn without a scheduled time (``intended=None``) is due when it asks for a slot.
        """
        cap, c = self._cap, self._counters
        if cap is None:
            asked = now = perf_counter()
        else:
            asked, now = await self._slot(cap)
        try:
            due = asked if intended is None else intended
            request_id = None if now >= self._stop_at else self.part.request_ids.take()
            if request_id is None:
                if due < self._stop_at <= now:
                    c.unsent += 1
                return None
            cfg = self.config
            record = RequestRecord(
                request_id=request_id,
                user_id=user_id,
                turn=turn,
                intended_start=due,
                sent=now,
                slot_wait=now - asked,
            )
            self.records.append(record)
            message = cfg.messages[request_id % len(cfg.messages)]
            c.open_streams += 1
            try:
                await self.target.request(http, conversation, message, record, time_limit=cfg.timeout)
            finally:
                c.open_streams -= 1
                if record.ok:
                    c.completed += 1
                else:
                    c.failed += 1
            return record
        finally:
            if cap is not None:
                cap.release()

    async def _conversation(
        self, http: aiohttp.ClientSession, user_id: int, first_intended: float | None
    ) -> bool:
        """One user's turns; False once the run sends no more."""
        cfg = self.config
        conversation = Conversation()
        intended = first_intended
        for turn in range(cfg.turns):
            record = await self._send(http, conversation, user_id, turn, intended)
            if record is None:
                return False
            if turn + 1 < cfg.turns:
                if cfg.think_time > 0:
                    intended = (record.end or perf_counter()) + cfg.think_time
                    if intended >= self._stop_at:
                        return False  # the next turn would come after sending stopped
                    await _sleep_until(intended)
                else:
                    intended = None
        return True

    async def _closed_user(self, http: aiohttp.ClientSession, slot: int) -> None:
        cfg = self.config
        first = self.start + cfg.ramp_up * slot / cfg.concurrency
        if first >= self._stop_at:
            return
        await _sleep_until(first)
        while await self._conversation(http, self._new_user_id(), None):
            pass

    async def _open_loop(self, http: aiohttp.ClientSession, arrivals: Sequence[float]) -> None:
        for offset in arrivals:
            at = self.start + offset
            if at >= self._stop_at or self.part.request_ids.exhausted:
                return
            await _sleep_until(at)
            self._spawn(self._conversation_task(http, at))

    async def _conversation_task(self, http: aiohttp.ClientSession, at: float) -> None:
        await self._conversation(http, self._new_user_id(), at)


async def arun_load_test(
    target: Target,
    config: LoadConfig,
    *,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
) -> LoadTestResult:
    """Run one load test inside the running event loop (notebooks: ``await`` it); with
    ``config.processes > 1`` in that many worker processes (:mod:`chatsse.loadworkers`)."""
    if config.processes > 1:
        from chatsse.loadworkers import arun_in_processes  # it imports this module

        return await arun_in_processes(target, config, progress=progress, progress_interval=progress_interval)
    return await LoadTest(target, config, progress=progress, progress_interval=progress_interval).run()


def sweep_configs(
    config: LoadConfig,
    *,
    rates: Sequence[float] | None = None,
    concurrencies: Sequence[int] | None = None,
) -> list[LoadConfig]:
    """One configuration per load level: open loop at each rate, or closed loop at each concurrency."""
    if (rates is None) == (concurrencies is None):
        raise ValueError("a sweep needs exactly one of rates or concurrencies")
    if rates is not None:
        return [replace(config, rate=rate) for rate in rates]
    assert concurrencies is not None
    return [replace(config, rate=None, concurrency=c) for c in concurrencies]


async def arun_sweep(
    target: Target,
    config: LoadConfig,
    *,
    rates: Sequence[float] | None = None,
    concurrencies: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
    on_result: Callable[[LoadTestResult], object] | None = None,
) -> list[LoadTestResult]:
    """Run one load test per level, in order; an interrupted run ends the sweep."""
    results = []
    for level in sweep_configs(config, rates=rates, concurrencies=concurrencies):
        result = await arun_load_test(target, level, progress=progress)
        results.append(result)
        if on_result is not None:
            on_result(result)
        if result.interrupted:
            break
    return results


async def arun_single_request(
    target: Target, message: str, *, time_limit: float | None = 300.0, on_text: TextCallback | None = None
) -> RequestRecord:
    """Send one request; ``on_text`` receives the reply as it streams."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
        await target.prepare(http)
        now = perf_counter()
        record = RequestRecord(request_id=0, user_id=0, turn=0, intended_start=now, sent=now)
        await target.request(http, Conversation(), message, record, time_limit=time_limit, on_text=on_text)
        return record


@contextmanager
def runner() -> Iterator[asyncio.Runner]:
    """An event loop for the sync entry points: uvloop when installed (less client CPU)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


def run_load_test(
    target: Target,
    config: LoadConfig,
    *,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
) -> LoadTestResult:
    """Run one load test in a new event loop (scripts). Ctrl-C returns the result so far."""
    with runner() as loop_runner:
        return loop_runner.run(
            arun_load_test(target, config, progress=progress, progress_interval=progress_interval)
        )


def run_sweep(
    target: Target,
    config: LoadConfig,
    *,
    rates: Sequence[float] | None = None,
    concurrencies: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
    on_result: Callable[[LoadTestResult], object] | None = None,
) -> list[LoadTestResult]:
    """:func:`arun_sweep` in a new event loop (scripts)."""
    with runner() as loop_runner:
        return loop_runner.run(
            arun_sweep(
                target,
                config,
                rates=rates,
                concurrencies=concurrencies,
                progress=progress,
                on_result=on_result,
            )
        )


def run_single_request(
    target: Target, message: str, *, time_limit: float | None = 300.0, on_text: TextCallback | None = None
) -> RequestRecord:
    """:func:`arun_single_request` in a new event loop (scripts)."""
    with runner() as loop_runner:
        return loop_runner.run(arun_single_request(target, message, time_limit=time_limit, on_text=on_text))


SWEEP_FORMAT = "chatsse-load-sweep/1"


def save_sweep(results: Sequence[LoadTestResult], path: str | Path) -> None:
    """Write several runs (a sweep) into one JSON file: ``{"format", "runs": [...]}``."""
    document = {"format": SWEEP_FORMAT, "runs": [r.to_dict() for r in results]}
    Path(path).write_text(json.dumps(document, separators=(",", ":")))


def load_results(path: str | Path) -> list[LoadTestResult]:
    """Read a file written by :meth:`LoadTestResult.save` or :func:`save_sweep`."""
    document = json.loads(Path(path).read_text())
    if document.get("format") == SWEEP_FORMAT:
        return [LoadTestResult.from_dict(run) for run in document["runs"]]
    return [LoadTestResult.from_dict(document)]
