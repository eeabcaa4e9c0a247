"""Every Prometheus metric chatsse exports, and the JSON summary derived from them.

Each app gets its own registry, so several servers can run in one process. Counters
move once per request or per stream, never per token. Under gunicorn, every scrape reports
all workers (prometheus-client's multiprocess mode; the collector is built once per app).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from chatsse.protocol import Outcome

__all__ = ["Metrics", "multiprocess_dir"]

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "chatsse"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_EVENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory, when serving with several workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests by route and status.",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request arrival to the end of the response (a stream's whole life).",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.open_streams = Gauge(
            f"{PREFIX}_open_streams", "SSE streams open now (admitted, not yet ended).",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.streams = Counter(
            f"{PREFIX}_streams", "Finished streams by outcome: where each one ended.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.stream_events = Counter(
            f"{PREFIX}_stream_events", "SSE events sent (all event types).", registry=r
        )
        self.stream_tokens = Counter(
            f"{PREFIX}_stream_tokens", "Reply tokens streamed as message events.", registry=r
        )
        self.first_event = Histogram(
            f"{PREFIX}_time_to_first_event_seconds",
            "Time from request arrival to a stream's first message event (its first token).",
            buckets=FIRST_EVENT_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            f"{PREFIX}_rejections", "Chat requests refused before streaming, by error type.",
            ["type"], registry=r,
        )  # fmt: skip
        self.conversations = Gauge(
            f"{PREFIX}_conversations", "Conversations held by the store.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        # One sample per live worker (its pid a label), so one scrape shows every worker's
        # count: how a soak run tells a task leak from a busy moment (chatsse/soak.py).
        self.worker_tasks = Gauge(
            f"{PREFIX}_worker_asyncio_tasks",
            "asyncio tasks alive in one worker process, sampled every second.",
            registry=r, multiprocess_mode="liveall",
        )  # fmt: skip

        self._outcomes: dict[str, Any] = {}  # label lookups take a lock: once per label value
        self._rejections: dict[str, Any] = {}
        path = multiprocess_dir()
        if path is None:
            self._collecting = self.registry
        else:
            self._collecting = CollectorRegistry()
            MultiProcessCollector(self._collecting, path=path)  # type: ignore[no-untyped-call]

    def _collecting_registry(self) -> CollectorRegistry:
        """This process's registry, or one reading every worker's files (multiprocess mode)."""
        return self._collecting

    def record_stream(self, outcome: Outcome, events: int, tokens: int, first_token_s: float | None) -> None:
        """One finished stream (chatsse/turns.py): the only metrics update a stream makes."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self.streams.labels(outcome)
        counter.inc()
        self.stream_events.inc(events)
        self.stream_tokens.inc(tokens)
        if first_token_s is not None:
            self.first_event.observe(first_token_s)

    def reject(self, error_type: str) -> None:
        """A chat refused before its stream started."""
        counter = self._rejections.get(error_type)
        if counter is None:
            counter = self._rejections[error_type] = self.rejections.labels(error_type)
        counter.inc()

    async def sample_worker(self, every: float) -> None:
        """Set this process's ``worker_tasks`` every ``every`` seconds, until cancelled (the
        app's lifespan runs it: at any moment, busy or idle, the gauge is at most that old)."""
        while True:
            self.worker_tasks.set(len(asyncio.all_tasks()))
            await asyncio.sleep(every)

    def render(self) -> bytes:
        """The Prometheus text exposition of the whole server (all workers)."""
        return generate_latest(self._collecting_registry())

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly digest of the same numbers, for people and notebooks."""
        values: dict[str, float] = {}
        by_label: dict[str, dict[str, float]] = {}
        for metric in self._collecting_registry().collect():
            for sample in metric.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == f"{PREFIX}_http_requests_total":
                    key = labels["status"]
                    by_label.setdefault("status", {})
                    by_label["status"][key] = by_label["status"].get(key, 0) + value
                elif name == f"{PREFIX}_streams_total":
                    by_label.setdefault("outcome", {})[labels["outcome"]] = value
                elif name == f"{PREFIX}_rejections_total":
                    by_label.setdefault("rejection", {})[labels["type"]] = value
                elif not labels or name.endswith(("_sum", "_count")):
                    values[name] = values.get(name, 0) + value
        first_count = values.get(f"{PREFIX}_time_to_first_event_seconds_count", 0)
        first_sum = values.get(f"{PREFIX}_time_to_first_event_seconds_sum", 0)
        statuses = by_label.get("status", {})
        return {
            "requests": int(sum(statuses.values())),
            "requests_by_status": {k: int(v) for k, v in sorted(statuses.items())},
            "open_streams": int(values.get(f"{PREFIX}_open_streams", 0)),
            "streams_by_outcome": {k: int(v) for k, v in sorted(by_label.get("outcome", {}).items())},
            "rejections": {k: int(v) for k, v in sorted(by_label.get("rejection", {}).items())},
            "events": int(values.get(f"{PREFIX}_stream_events_total", 0)),
            "tokens": int(values.get(f"{PREFIX}_stream_tokens_total", 0)),
            "mean_time_to_first_event_ms": (
                round(1000 * first_sum / first_count, 3) if first_count else None
            ),
            "conversations": int(values.get(f"{PREFIX}_conversations", 0)),
        }
