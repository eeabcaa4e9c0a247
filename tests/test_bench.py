"""``scripts/bench_server.py --quick``: every server starts, every measurement runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_server.py"


def test_quick_bench_measures_every_server(tmp_path: Path) -> None:
    output = tmp_path / "build" / "bench.json"  # a directory that does not exist yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
    )
    assert process.returncode == 0, process.stderr
    report = json.loads(output.read_text())
    assert list(report["servers"]) == ["bare-asgi", "sse-starlette", "chatsse"]
    plan = report["plan"]
    for name, server in report["servers"].items():
        events = server["events"]
        assert events["errors"] == {}, name
        assert events["events"] == plan["long_requests"] * (plan["long_tokens"] + 2), name
        assert server["requests"]["events_per_request"] == plan["short_tokens"] + 2, name
        steady = server["steady"]
        assert steady["streams"] == plan["steady_streams"], name
        assert steady["events"] > 0, name  # every stream was mid-reply through the window
        assert server["memory"]["streams"] == plan["streams"]
        assert server["memory"]["peak_rss_kib"] > 0
        assert server["paced"]["levels"], name
    assert set(report["ratios"]) == {
        "cpu_per_event_vs_bare",
        "cpu_per_event_steady_vs_bare",
        "cpu_per_request_vs_bare",
        "memory_per_stream_vs_bare",
    }
    for row in (
        "server CPU per event, bursts (us)",
        "memory per open stream (KiB)",
        "client CPU per event (us)",
    ):
        assert row in process.stdout


def test_quick_openai_bench_measures_both_fronts_and_the_proxy(tmp_path: Path) -> None:
    output = tmp_path / "bench_openai.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}
    process = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "bench_openai.py"), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
    )
    assert process.returncode == 0, process.stderr
    report = json.loads(output.read_text())
    assert report["fronts"]["errors"] == {}
    plan = report["plan"]
    for front in ("/chat", "/v1/chat/completions"):  # every token of every reply, on each front
        assert report["fronts"]["fronts"][front]["bursts_tokens"] == [
            plan["long_requests"] * plan["long_tokens"]
        ]
    levels = report["proxy"]["levels"]
    paced_ms = plan["proxy_ttft_ms"] + (plan["proxy_tokens"] - 1) * plan["proxy_interval_ms"]
    assert [level["streams"] for level in levels] == list(report["plan"]["proxy_levels"])
    for level in levels:
        for name in ("direct", "proxy"):
            assert level[name]["failed"] == 0
            # The upstream's pace shows through: no reply ends before the upstream's schedule
            # (its TTFT, then an interval per token) has run. Not the gaps between tokens: the
            # upstream's deadlines are absolute, so a late loop sends tokens in bursts, and a
            # client that a busy machine leaves waiting reads several at once.
            assert level[name]["e2e_min_ms"] >= 0.95 * paced_ms
        for run in level["rounds"]:
            assert run["added"]["ttft_p50_ms"] == run["proxy"]["ttft_p50_ms"] - run["direct"]["ttft_p50_ms"]
        assert len(level["rounds"]) == report["plan"]["proxy_repeats"]
    assert "proxy added latency (ms)" in process.stdout


def test_median_run_keeps_the_middle_run_and_every_value() -> None:
    spec = importlib.util.spec_from_file_location("bench_server", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_server"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    runs = [{"us": 7.0, "tag": "a"}, {"us": 3.0, "tag": "b"}, {"us": 5.0, "tag": "c"}]
    assert bench.median_run(runs, "us") == {"us": 5.0, "tag": "c", "all_us": [7.0, 3.0, 5.0]}
    assert bench.median_run(runs[:2], "us")["tag"] == "b"  # even count: the lower middle


def test_quick_resume_bench_measures_the_log_resume_and_stop(tmp_path: Path) -> None:
    output = tmp_path / "bench_resume.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}
    process = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "bench_resume.py"), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert process.returncode == 0, process.stderr
    report = json.loads(output.read_text())
    plan = report["plan"]
    assert report["log_cost"]["us_per_event_log_on"] > 0
    assert report["log_cost"]["us_per_event_log_off"] > 0
    assert "sqlite" in report["latency"]
    for store, latency in report["latency"].items():
        for kind in ("resume", "stop"):
            assert latency[kind]["replies"] == plan["replies"], store
            assert 0 < latency[kind]["p50_ms"] <= latency[kind]["p99_ms"], store
        assert latency["resume"]["mismatches"] == 0, store
        assert latency["stop"]["not_stopped"] == 0, store
    assert "sqlite: resume latency p50 / p99 (ms)" in process.stdout
