"""Prometheus metrics and the JSON summary move as requests are served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from support import chat, metric_value

from chatsse import metrics as metrics_module


def test_metrics_count_requests_streams_events_and_tokens(client: httpx.Client) -> None:
    results = [chat(client, f"question {i}") for i in range(3)]
    client.post("/chat", json={"message": "x", "conversation_id": "missing"})
    text = client.get("/metrics").text
    tokens = sum(len(r.deltas) for r in results)
    events = sum(len(r.events) for r in results)
    assert metric_value(text, "chatsse_http_requests_total", route="/chat", status="200") == 3
    assert metric_value(text, "chatsse_http_requests_total", route="/chat", status="404") == 1
    assert metric_value(text, "chatsse_http_request_duration_seconds_count", route="/chat") == 4
    assert metric_value(text, "chatsse_streams_total", outcome="stop") == 3
    assert metric_value(text, "chatsse_stream_tokens_total") == tokens
    assert metric_value(text, "chatsse_stream_events_total") == events
    assert metric_value(text, "chatsse_time_to_first_event_seconds_count") == 3
    assert metric_value(text, "chatsse_open_streams") == 0
    assert metric_value(text, "chatsse_conversations") == 3
    assert metric_value(text, "chatsse_rejections_total", type="conversation_not_found") == 1


def test_unmatched_paths_share_one_label(client: httpx.Client) -> None:
    for path in ("/a", "/b", "/c"):
        client.get(path)
    text = client.get("/metrics").text
    assert metric_value(text, "chatsse_http_requests_total", route="unmatched", status="404") == 3
    assert 'route="/a"' not in text


def test_stats_summarises_the_same_numbers(client: httpx.Client) -> None:
    results = [chat(client, f"q{i}") for i in range(2)]
    everything = client.get("/stats").json()
    assert everything["this_worker"]["open_streams"] == 0
    stats = everything["all_workers"]
    assert stats["requests_by_status"]["200"] == 2
    assert stats["streams_by_outcome"] == {"stop": 2}
    assert stats["tokens"] == sum(len(r.deltas) for r in results)
    assert stats["events"] == sum(len(r.events) for r in results)
    assert stats["open_streams"] == 0
    assert stats["conversations"] == 2
    assert stats["mean_time_to_first_event_ms"] > 0


def test_unknown_methods_share_one_label(client: httpx.Client) -> None:
    for method in ("PROPFIND", "TRACE", "MKCOL"):
        client.request(method, "/health")
    text = client.get("/metrics").text
    assert (
        metric_value(text, "chatsse_http_requests_total", method="OTHER", route="/health", status="405") == 3
    )
    assert 'method="PROPFIND"' not in text


def test_the_all_workers_collector_is_built_once_per_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics and /stats read every worker's files through one collector, not a new one
    per scrape."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    built: list[str] = []
    real = metrics_module.MultiProcessCollector

    def counting(registry: Any, path: str) -> Any:
        built.append(path)
        return real(registry, path=path)

    monkeypatch.setattr(metrics_module, "MultiProcessCollector", counting)
    metrics = metrics_module.Metrics()
    for _ in range(3):
        metrics.render()
        assert metrics.summary()["requests"] == 0
    assert built == [str(tmp_path)]


def test_each_worker_samples_its_asyncio_tasks(client: httpx.Client) -> None:
    """The app's lifespan sets the gauge at start-up and every second after (under gunicorn,
    one sample per live worker, labelled with its pid: tests/test_soak.py reads them)."""
    assert metric_value(client.get("/metrics").text, "chatsse_worker_asyncio_tasks") >= 1
