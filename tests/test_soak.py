"""``make soak`` and ``make chaos`` in their quick modes, against real servers (a 4-worker
gunicorn, a real redis-server, a real tmpfs), and the checks shown able to fail."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Serve
from redis_server import MISSING as REDIS_MISSING

from chatsse.soak import WorkerSample, errors_check, leak_check, rss_check, turns_check
from chatsse.traffic import (
    BAD_KINDS,
    KINDS,
    PROBE,
    CompletedTurn,
    Exchange,
    Traffic,
    TrafficRecord,
    missing_turns,
)

SCRIPTS = Path(__file__).parent.parent / "scripts"


def _run(
    script: str, output: Path, *args: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str], Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}
    process = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", "--output", str(output), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    report = json.loads(output.read_text()) if output.exists() else None
    return process, report


def test_quick_soak_passes_every_check(tmp_path: Path) -> None:
    process, report = _run("soak.py", tmp_path / "soak.json", timeout=110)
    assert report is not None, process.stderr
    failed = [c for c in report["checks"] if not c["ok"]]
    assert process.returncode == 0, (failed, process.stdout[-3000:])
    assert {c["name"] for c in report["checks"]} == {
        "rss_growth", "tasks_leak", "fds_leak", "workers_kept", "unexpected_errors", "completed_turns_stored",
    }  # fmt: skip
    assert report["ok"] is True
    sent = report["requests"]
    assert set(sent) == set(KINDS) - {PROBE}  # every front, every way a turn can go, every bad request
    assert report["unexpected"] == {}
    for kind, (status, error_type) in BAD_KINDS.items():
        assert report["endings"][kind] == {f"http_{status}:{error_type}": sent[kind]}  # refused as asked
    assert sum(report["expected_refusals"].values()) == sum(sent[kind] for kind in BAD_KINDS)
    start, end = report["workers"]["start"], report["workers"]["end"]
    assert len(start) == len(end) == 4
    for worker in (*start, *end):  # every worker measured, the tasks from its own gauge
        assert worker["rss_kib"] > 0
        assert worker["fds"] > 0
        assert worker["tasks"] >= 1
    # Every moment on one clock, in the order they happened: warm-up, at rest, the traffic and
    # its busy samples, at rest again.
    phases, workers = report["phases"], report["workers"]
    traffic_began = phases["traffic"]["began_at_s"]
    assert phases["warmup"]["began_at_s"] <= workers["start_at_s"] <= traffic_began
    assert report["timeline"]
    assert all(traffic_began <= sample["at_s"] <= workers["end_at_s"] for sample in report["timeline"])
    traffic_ended = traffic_began + phases["traffic"]["seconds"]
    assert traffic_ended <= workers["end_at_s"] + 0.1 <= report["seconds"] + 0.2
    assert report["turns"]["completed"] > 100
    assert report["turns"]["missing_count"] == 0
    sizes = report["store_size"]
    assert sizes["end"]["conversations"] > sizes["start"]["conversations"] > 0
    assert sizes["end"]["sqlite-db_bytes"] > 0
    assert "PASSED" in process.stdout


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Any]:
    """One quick chaos run (every fault, on both stores) for the tests below."""
    output = tmp_path_factory.mktemp("chaos") / "chaos.json"
    return _run("chaos.py", output, timeout=115)


def _fault(report: Any, store: str, name: str) -> dict[str, Any]:
    for skip in report["skipped"]:
        if (skip["store"], skip["fault"]) == (store, name):
            if store == "redis" and os.environ.get("CHATSSE_REQUIRE_BINARIES") == "1":
                pytest.fail(REDIS_MISSING)
            pytest.skip(f"{name} on {store}: {skip['reason']}")
    (run,) = [r for r in report["runs"] if r["store"] == store]
    (fault,) = [f for f in run["faults"] if f["fault"] == name]
    return fault


def _common(fault: dict[str, Any]) -> None:
    assert fault["ok"] is True, fault["problems"]
    assert fault["turns_lost"] == 0
    assert fault["turns_completed"] > 0
    recovery = fault["recovery"]
    assert recovery["recovered_after_s"] is not None  # measured: probes completed again
    assert recovery["sent"] >= 5
    assert sum(fault["stream_endings"].values()) == fault["streams_open"] > 0


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_quick_chaos_kill_worker_loses_no_completed_turn(
    chaos: tuple[subprocess.CompletedProcess[str], Any], store: str
) -> None:
    process, report = chaos
    assert report is not None, process.stderr[-3000:]
    fault = _fault(report, store, "kill_worker")
    _common(fault)
    assert fault["victim_streams"] >= 1  # the killed worker was serving streams
    assert fault["replaced_after_s"] is not None  # gunicorn started another worker
    assert fault["replacement_serving_after_s"] is not None  # and its app came up
    # The victim's streams end with the connection closed; a resumed /chat one ends with stream_lost.
    endings = fault["stream_endings"]
    assert any(ending.startswith("closed") for ending in endings), endings


def test_quick_chaos_redis_restart_is_an_outage_then_a_recovery(
    chaos: tuple[subprocess.CompletedProcess[str], Any],
) -> None:
    process, report = chaos
    assert report is not None, process.stderr[-3000:]
    fault = _fault(report, "redis", "redis_restart")
    _common(fault)
    recovery = fault["recovery"]
    assert recovery["failed"] > 0  # the probes saw the outage
    assert recovery["recovered_after_s"] >= fault["restart_began_after_s"]  # once Redis was back
    assert fault["redis_exit_code"] == 0
    assert fault["failed_during"]  # the traffic saw it too (503 storage_unavailable, storage_error)


def test_quick_chaos_disk_full_fails_writes_then_recovers(
    chaos: tuple[subprocess.CompletedProcess[str], Any],
) -> None:
    process, report = chaos
    assert report is not None, process.stderr[-3000:]
    fault = _fault(report, "sqlite", "disk_full")
    _common(fault)
    assert fault["writes_failed_after_s"] is not None
    assert fault["recovery"]["failed"] > 0
    assert fault["free_bytes_after"] > 0


def test_quick_chaos_exit_code_is_the_reports_verdict(
    chaos: tuple[subprocess.CompletedProcess[str], Any],
) -> None:
    process, report = chaos
    assert report is not None, process.stderr[-3000:]
    assert process.returncode == (0 if report["ok"] else 1), process.stdout[-3000:]
    assert report["ok"] is True, process.stdout[-3000:]


# --- the checks can fail ---


def test_the_turn_check_flags_a_deleted_conversation_and_a_changed_reply(serve: Serve) -> None:
    server = serve(max_message_size=4096)

    async def run() -> tuple[TrafficRecord, list[Any]]:
        record = await Traffic(server.url, concurrency=4, max_message_size=4096).run(duration=1.5)
        return record, await missing_turns(server.url, record.turns)

    record, clean = asyncio.run(run())
    assert record.turns
    assert clean == []  # everything the clients saw complete is there
    victim = record.turns[0]
    with httpx.Client(base_url=server.url) as client:
        assert client.delete(f"/conversations/{victim.conversation_id}").status_code == 204
    changed = CompletedTurn(
        victim.front, record.turns[-1].conversation_id, record.turns[-1].message_id, "0" * 24, None, 0.0
    )
    missing = asyncio.run(missing_turns(server.url, [*record.turns, changed]))
    deleted = [t for t in record.turns if t.conversation_id == victim.conversation_id]
    flagged = {(m.turn.message_id, m.why) for m in missing}
    assert {(t.message_id, "conversation not found") for t in deleted} <= flagged
    assert (changed.message_id, "stored content differs from what the client saw") in flagged
    assert len(missing) == len(deleted) + 1
    assert not turns_check(missing, len(record.turns)).ok


def _samples(rss: int = 100_000, fds: int = 30, tasks: int | None = 3) -> list[WorkerSample]:
    return [WorkerSample(pid, rss, fds, 2, tasks) for pid in (11, 12)]


def test_the_leak_and_rss_checks_flag_growth_beyond_their_tolerance() -> None:
    start = _samples()
    assert leak_check("tasks", start, _samples(tasks=5), tolerance=2).ok
    leaked = leak_check("tasks", start, [*_samples(tasks=3)[:1], WorkerSample(12, 100_000, 30, 2, 6)], 2)
    assert not leaked.ok
    assert "12: +3" in leaked.detail
    assert not leak_check("fds", start, _samples(fds=35), tolerance=4).ok
    assert not leak_check("tasks", start, _samples(tasks=None), tolerance=2).ok  # not measured is not passed
    assert rss_check(start, _samples(rss=109_000), limit=0.10).ok
    assert not rss_check(start, _samples(rss=111_000), limit=0.10).ok


def test_the_error_check_counts_any_unexpected_ending_but_not_refusals_asked_for() -> None:
    record = TrafficRecord()
    record.exchanges.append(Exchange("bad_size", 0.0, 0.1, 413, ending="http_413:message_too_large"))
    assert errors_check(record).ok
    record.exchanges.append(Exchange("chat", 0.0, 0.1, 200, 0.05, ending="closed", problem="closed"))
    check = errors_check(record)
    assert not check.ok
    assert check.detail == "chat: closed x1"
