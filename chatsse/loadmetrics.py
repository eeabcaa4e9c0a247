"""Metrics of an LLM-serving load test, computed from per-request records.

Pure computations: no I/O, no clock. All times are seconds on the run's monotonic clock;
the latency keys of ``Summary.as_dict()`` are milliseconds (``*_ms``), like vLLM's.

Sources followed (read in their code, not their docs):

- vLLM ``vllm/benchmarks/serve.py`` (``calculate_metrics`` and ``benchmark``, commit
  009e6d4a): TTFT, TPOT, ITL, E2E, goodput from send (``request_goodput``), the client's
  queue time (``client_queue_time``: the wait for a ``--max-concurrency`` slot, from the
  moment the request was due to the send) and ``e2el_including_client_queue``; std with
  ddof=0 and numpy's linear percentiles.
- GuideLLM ``src/guidellm/benchmark/schemas/metrics.py`` and
  ``src/guidellm/scheduler/constraints/request.py`` (commit ee7a7745): rates count what
  completed inside the measurement window, and a duration bound ends that window (GuideLLM
  cancels what is still in flight; we let it drain but leave it out of the rates).

Definitions:

- completed: requests that are ``ok`` (no error and HTTP status 200). Failed: all others,
  also counted per error type.
- TTFT (time to first token) = ``first_token_at - sent``: arrival of the first content
  (token) event.
- E2E latency (``e2el``) = ``end - sent``, where ``end`` is the end of the response stream.
  (vLLM's latency stops at the last content chunk; ours also covers trailing
  usage/``[DONE]`` events.)
- Intended start: when the schedule wanted the request sent: its open-loop arrival, or the
  end of the user's previous turn plus the think time; a turn with nothing to wait for (a
  closed-loop user's next turn, a turn without think time) is due when the user asks for a
  concurrency slot.
- Lateness = ``sent - intended_start``: everything that held the request back, its slot
  wait plus the client's own delay in getting to it (a saturated event loop).
- Slot wait = the part of the lateness spent waiting for a ``max_concurrency`` slot (vLLM's
  ``client_queue_time``), kept for every turn, multi-turn users' included; 0 without a
  cap. Lateness minus slot wait is the client's own lag, which the client self-check
  (:mod:`chatsse.loadhealth`) explains.
- Intended E2E latency = ``end - intended_start``: the latency a user who arrived on the
  schedule saw (guards against coordinated omission in open-loop runs).
- TPOT (time per output token, excluding the first) =
  ``(last content event arrival - first_token_at) / (tokens - 1)``, only for requests with
  ``tokens > 1``. vLLM's per-request TPOT is ``(e2e - ttft) / (output_tokens - 1)`` where
  its e2e ends at the last content chunk, so this is the same quantity. We deliberately do
  not use ``end``: trailing usage/``[DONE]`` events and the connection close are not token
  generation. ``tokens`` is the server-reported completion token count when known, so
  several tokens per event are accounted for.
- ITL (inter-token latency): every gap between consecutive content events of a request,
  pooled over all completed requests (one sample per gap, so long responses weigh more), as
  vLLM does. An event carrying several tokens gives one ITL sample.
- Window (``Summary.duration``): the time the load was applied, from the run's start until
  sending stopped: the end of the ``duration`` bound, or the run's end if that came first
  (a request-bound run ends when its last stream does, vLLM's benchmark duration; an
  interrupted run ends at the interruption). A duration-bound run's drain is not in it.
- Throughputs count the completed requests whose stream ended inside the window, with all
  their tokens and events: ``request_throughput = completed in window / window``;
  ``output_token_throughput``, ``input_token_throughput`` (known prompt tokens) and
  ``event_throughput`` likewise; ``total_token_throughput`` is input plus output. A request-bound run's
  window holds every request. Requests that completed during a drain (``drained``) are in
  ``completed`` and in the latency statistics, but not in the rates: their time is not in
  the window, and counting them would report a rate the server never sustained. A window
  shorter than a few reply times reads low (the first replies take a latency to arrive).
- SLO attainment: a request meets the SLO when it completed and its TTFT and E2E, each
  measured from its intended start, and its TPOT are within every threshold set
  (value <= threshold, as vLLM). A request with at most one token has no TPOT and passes a
  TPOT threshold (vLLM counts its TPOT as 0); one without a TTFT or E2E value fails a
  threshold on it. Without an SLO every completed request is good. Measuring from the
  intended start means a run whose requests queued (for a slot, or behind a client that
  fell behind its schedule) does not look good: the wait was the user's. When the client
  itself fell behind, the self-check says so, and the run measured the client, not the
  server. The same test from send (vLLM's ``request_goodput``) is reported beside it as
  ``*_from_send``; the two differ only when some request was sent late.
- Goodput = good requests that ended inside the window / window (from send:
  ``goodput_from_send``). ``good_fraction`` = good requests / all requests (sent), the SLO
  attainment.
- Rows identical by construction are left out (``None``): intended E2E and lateness when
  every request was sent at its intended start (a closed loop without think time or a
  cap), slot wait when no request waited for a slot.
- Stats: ``std`` is the population standard deviation (ddof=0, numpy's default, what vLLM
  reports). ``median`` and the ``pN`` percentiles use linear interpolation between closest
  ranks (numpy's default ``method="linear"``): for n sorted values x, rank
  r = (n - 1) * p / 100 and the percentile is
  ``x[floor(r)] + (x[ceil(r)] - x[floor(r)]) * (r - floor(r))``. TTFT, TPOT, ITL, E2E and
  intended E2E stats cover completed requests only; lateness and slot wait cover every
  request, since every record was sent. An empty series has no stats (``None``; vLLM would
  report 0).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

__all__ = [
    "SLO",
    "RequestRecord",
    "Stats",
    "Summary",
    "ms_keys",
    "percentile",
    "summarize",
    "timeline",
]

MetricValue = float | int | dict[str, int] | None


@dataclass(slots=True)
class RequestRecord:
    """What the load client observed for one request."""

    request_id: int
    user_id: int  # 0 for single-turn runs
    turn: int  # 0-based turn within the user's conversation
    intended_start: float  # when the schedule wanted it sent (see the module docstring)
    sent: float
    headers_at: float | None = None
    first_token_at: float | None = None  # arrival of the first content event
    token_times: list[float] = field(default_factory=list)  # every content event, first included
    end: float | None = None
    events: int = 0  # all SSE events, control ones included
    tokens: int = 0  # server-reported completion tokens if known, else content events
    bytes_received: int = 0
    # Resumed streams (ChatsseTarget's drop_fraction): disconnect -> first resumed event, each.
    resume_latencies: list[float] = field(default_factory=list)
    status: int | None = None  # HTTP status
    error: str | None = None  # "http_503", "timeout", "connection", "stream_error:<type>", ...
    prompt_tokens: int | None = None
    slot_wait: float = 0.0  # seconds spent waiting for a max_concurrency slot before ``sent``
    text: str | None = None  # the reply, when the target collected it

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    @property
    def e2e_intended(self) -> float | None:
        return None if self.end is None else self.end - self.intended_start

    @property
    def lateness(self) -> float:
        return self.sent - self.intended_start

    @property
    def ttft_intended(self) -> float | None:
        """TTFT from the intended start: the wait a user who arrived on the schedule saw."""
        return None if self.first_token_at is None else self.first_token_at - self.intended_start

    @property
    def e2e_with_wait(self) -> float | None:
        """E2E plus the slot wait (vLLM's ``e2el_including_client_queue``)."""
        return None if self.end is None else self.end - self.sent + self.slot_wait

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive content events."""
        return [b - a for a, b in pairwise(self.token_times)]

    @property
    def tpot(self) -> float | None:
        """(last content event - first token) / (tokens - 1); None for <= 1 token.

        The end point is the last content event, not ``end`` (see module docs).
        """
        if self.tokens <= 1 or self.first_token_at is None or not self.token_times:
            return None
        return (self.token_times[-1] - self.first_token_at) / (self.tokens - 1)


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request latency thresholds in seconds; ``None`` means not checked."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met_by(self, record: RequestRecord, *, from_intended_start: bool = False) -> bool:
        """Whether a completed request meets every set threshold, its TTFT and E2E measured
        from its send, or from its intended start (the module docstring)."""
        if from_intended_start:
            ttft, e2e = record.ttft_intended, record.e2e_intended
        else:
            ttft, e2e = record.ttft, record.e2e
        for limit, value in ((self.ttft, ttft), (self.e2e, e2e)):
            if limit is not None and (value is None or value > limit):
                return False
        if self.tpot is not None:
            tpot = record.tpot
            if tpot is not None and tpot > self.tpot:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary statistics of one latency series (seconds)."""

    mean: float
    median: float
    std: float  # population std (ddof=0)
    p50: float
    p90: float
    p95: float
    p99: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        """Stats of the values, or None if there are none."""
        xs = sorted(values)
        n = len(xs)
        if n == 0:
            return None
        mean = math.fsum(xs) / n
        # Two-pass variance: accurate, and unlike statistics.pstdev (exact
        # fractions) fast enough for millions of pooled ITL samples.
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / n)
        median = _percentile_sorted(xs, 50.0)
        return cls(
            mean=mean,
            median=median,
            std=std,
            p50=median,
            p90=_percentile_sorted(xs, 90.0),
            p95=_percentile_sorted(xs, 95.0),
            p99=_percentile_sorted(xs, 99.0),
            min=xs[0],
            max=xs[-1],
            count=n,
        )


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation, like numpy's default."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty series")
    return _percentile_sorted(xs, p)


def _percentile_sorted(xs: Sequence[float], p: float) -> float:
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    rank = (len(xs) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass(frozen=True, slots=True)
class Summary:
    """Aggregate results of a run; see the module docstring for definitions."""

    completed: int
    failed: int
    errors_by_type: dict[str, int]
    duration: float  # the window the rates divide by (module docstring)
    total_input_tokens: int  # known prompt tokens of completed requests
    total_output_tokens: int  # tokens of completed requests
    total_events: int  # events of completed requests
    request_throughput: float  # completed in the window / window
    output_token_throughput: float
    event_throughput: float
    good: int  # completed requests meeting the SLO from their intended start
    goodput: float  # good requests completed in the window / window
    good_fraction: float | None  # good / sent; None when there were no requests
    ttft: Stats | None
    tpot: Stats | None
    itl: Stats | None
    e2e: Stats | None
    e2e_intended: Stats | None  # None when every request was sent at its intended start
    lateness: Stats | None  # likewise
    slo: SLO | None = None
    resumed: int = 0  # completed requests whose stream was dropped and resumed
    resume: Stats | None = None  # disconnect -> first resumed event
    slot_wait: Stats | None = None  # None when no request waited for a slot
    drained: int = 0  # completed requests that ended after the window (not in the rates)
    good_from_send: int = 0  # the SLO test from send (vLLM's)
    goodput_from_send: float = 0.0
    good_fraction_from_send: float | None = None
    input_token_throughput: float = 0.0  # known prompt tokens of requests completed in the window

    @property
    def total_token_throughput(self) -> float:
        """Input plus output tokens per second (vLLM's ``total_token_throughput``)."""
        return self.input_token_throughput + self.output_token_throughput

    def as_dict(self) -> dict[str, MetricValue]:
        """Flat dict with vLLM-like keys; latencies in milliseconds."""
        out: dict[str, MetricValue] = {
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "total_events": self.total_events,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_token_throughput,
            "total_token_throughput": self.total_token_throughput,
            "event_throughput": self.event_throughput,
            "goodput": self.goodput,
            "good_fraction": self.good_fraction,
            "goodput_from_send": self.goodput_from_send,
            "good_fraction_from_send": self.good_fraction_from_send,
            "drained": self.drained,
            "errors": dict(self.errors_by_type),
            "resumed": self.resumed,
        }
        series = {
            "ttft": self.ttft,
            "tpot": self.tpot,
            "itl": self.itl,
            "e2el": self.e2e,
            "e2el_intended": self.e2e_intended,
            "lateness": self.lateness,
            "slot_wait": self.slot_wait,
            "resume": self.resume,
        }
        for name, stats in series.items():
            out.update(ms_keys(name, stats))
        return out


def ms_keys(name: str, stats: Stats | None) -> dict[str, MetricValue]:
    """vLLM's keys for one series: ``mean_<name>_ms``, ``median_``, ``std_``, ``p50_`` ...
    ``p99_``, in milliseconds; ``None`` values for an empty series."""
    return {
        f"{stat}_{name}_ms": None if stats is None else getattr(stats, stat) * 1000.0
        for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99")
    }


def _error_type(record: RequestRecord) -> str:
    if record.error is not None:
        return record.error
    return "unknown" if record.status is None else f"http_{record.status}"


def summarize(
    records: Sequence[RequestRecord], *, duration: float, slo: SLO | None = None, until: float | None = None
) -> Summary:
    """Aggregate per-request records of a run whose window lasted ``duration`` seconds.

    ``until``: the window's end on the records' clock; completed requests that ended
    after it are left out of the rates (``drained``). ``None`` counts them all.
    """
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration}")
    done = [r for r in records if r.ok]
    in_window = done if until is None else [r for r in done if r.end is not None and r.end <= until]
    errors = Counter(_error_type(r) for r in records if not r.ok)
    good = [r for r in done if slo is None or slo.met_by(r, from_intended_start=True)]
    good_from_send = [r for r in done if slo is None or slo.met_by(r)]
    output_tokens = sum(r.tokens for r in in_window)
    events = sum(r.events for r in in_window)
    scheduled = any(r.intended_start != r.sent for r in records)
    waited = any(r.slot_wait > 0 for r in records)
    return Summary(
        completed=len(done),
        failed=len(records) - len(done),
        errors_by_type=dict(sorted(errors.items())),
        duration=duration,
        total_input_tokens=sum(r.prompt_tokens or 0 for r in done),
        total_output_tokens=sum(r.tokens for r in done),
        total_events=sum(r.events for r in done),
        request_throughput=len(in_window) / duration,
        output_token_throughput=output_tokens / duration,
        event_throughput=events / duration,
        good=len(good),
        goodput=_count_until(good, until) / duration,
        good_fraction=len(good) / len(records) if records else None,
        ttft=Stats.of(v for r in done if (v := r.ttft) is not None),
        tpot=Stats.of(v for r in done if (v := r.tpot) is not None),
        itl=Stats.of(gap for r in done for gap in r.itls),
        e2e=Stats.of(v for r in done if (v := r.e2e) is not None),
        e2e_intended=Stats.of(v for r in done if (v := r.e2e_intended) is not None) if scheduled else None,
        lateness=Stats.of(r.lateness for r in records) if scheduled else None,
        slo=slo,
        resumed=sum(1 for r in done if r.resume_latencies),
        resume=Stats.of(v for r in done for v in r.resume_latencies),
        slot_wait=Stats.of(r.slot_wait for r in records) if waited else None,
        drained=len(done) - len(in_window),
        good_from_send=len(good_from_send),
        goodput_from_send=_count_until(good_from_send, until) / duration,
        good_fraction_from_send=len(good_from_send) / len(records) if records else None,
        input_token_throughput=sum(r.prompt_tokens or 0 for r in in_window) / duration,
    )


def _count_until(records: Sequence[RequestRecord], until: float | None) -> int:
    if until is None:
        return len(records)
    return sum(1 for r in records if r.end is not None and r.end <= until)


def _closed_at(record: RequestRecord) -> float:
    """When the stream stopped being open: ``end``, else its last observed activity."""
    if record.end is not None:
        return record.end
    last = record.sent
    if record.headers_at is not None:
        last = max(last, record.headers_at)
    if record.token_times:
        last = max(last, record.token_times[-1])
    return last


def timeline(records: Sequence[RequestRecord], *, bucket: float) -> list[tuple[float, float, int]]:
    """Token rate and open streams over time, for plots.

    Returns one ``(start, tokens_per_second, open_streams)`` row per bucket of
    ``bucket`` seconds; ``start`` is measured from the first send, buckets run
    until the last stream closed. Tokens are those of every request, failed
    ones included (they were streamed all the same), placed at their content
    events' arrival; an event carries ``tokens / len(token_times)`` tokens so
    server-reported counts are spread over the events. The rate divides by the
    full bucket width, also for the last, partial bucket. A stream is open
    from ``sent`` until ``end`` (or its last observed activity if ``end`` is
    missing), counted at each bucket start.
    """
    if not bucket > 0:
        raise ValueError(f"bucket must be positive, got {bucket}")
    if not records:
        return []
    t0 = min(r.sent for r in records)
    closes = sorted(_closed_at(r) for r in records)
    starts = sorted(r.sent for r in records)
    n = int((closes[-1] - t0) // bucket) + 1
    tokens = [0.0] * n
    for r in records:
        if not r.token_times:
            continue
        weight = r.tokens / len(r.token_times)
        for t in r.token_times:
            tokens[min(max(int((t - t0) // bucket), 0), n - 1)] += weight
    rows = []
    for i, count in enumerate(tokens):
        at = t0 + i * bucket
        open_streams = bisect_right(starts, at) - bisect_right(closes, at)
        rows.append((i * bucket, count / bucket, open_streams))
    return rows
