"""Load tests split over worker processes (``processes > 1``) against real servers: the
plan is dealt out exactly, the results merge into one, Ctrl-C and failures behave as in
one process."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from pathlib import Path

import httpx
import pytest
from conftest import Serve
from load_support import BrokenTarget, max_in_flight
from support import wait_for

from chatsse.loadgen import (
    LoadConfig,
    LoadTestResult,
    Progress,
    arrival_times,
    arun_load_test,
    run_load_test,
    split_run,
)
from chatsse.loadmetrics import RequestRecord
from chatsse.loadtargets import ChatsseTarget
from chatsse.loadworkers import SharedIds, check_clock

# --- the plan -----------------------------------------------------------------------------


def test_split_deals_every_arrival_and_user_to_one_process() -> None:
    config = LoadConfig(requests=50, rate=20, processes=3, max_concurrency=8, seed=4)
    shares = split_run(config)
    assert [s.index for s in shares] == [0, 1, 2]
    dealt = sorted(t for s in shares for t in s.arrivals)
    assert dealt == arrival_times(20, count=50, seed=4)  # the whole schedule, each arrival once
    assert [len(s.arrivals) for s in shares] == [17, 17, 16]
    assert [s.max_concurrency for s in shares] == [3, 3, 2]  # 8 slots in all
    closed = split_run(LoadConfig(requests=10, concurrency=5, processes=2))
    assert [s.users for s in closed] == [(0, 2, 4), (1, 3)]
    assert [s.max_concurrency for s in closed] == [None, None]


def test_a_split_needs_a_user_and_a_slot_per_process() -> None:
    with pytest.raises(ValueError, match="concurrency >= processes"):
        LoadConfig(requests=4, concurrency=2, processes=3)
    with pytest.raises(ValueError, match="max_concurrency is split"):
        LoadConfig(requests=4, rate=10, max_concurrency=1, processes=2)
    with pytest.raises(ValueError, match="processes must be at least 1"):
        LoadConfig(requests=4, processes=0)


def test_shared_ids_count_once_across_copies(tmp_path: Path) -> None:
    path = SharedIds.create(str(tmp_path))
    a = SharedIds(path, 0, limit=3)
    b = pickle.loads(pickle.dumps(a))  # what a worker process gets: the same counter
    other = SharedIds(path, 1)
    assert [a.take(), b.take(), a.take(), b.take()] == [0, 1, 2, None]
    assert a.exhausted
    assert b.exhausted
    assert other.take() == 0  # its own slot
    for ids in (a, b, other):
        ids.close()


def test_only_a_machine_wide_clock_splits_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    check_clock()  # Linux: CLOCK_MONOTONIC
    real = time.get_clock_info

    def other_clock(name: str) -> object:
        info = real(name)
        info.implementation = "a per-process clock"  # type: ignore[attr-defined]
        return info

    monkeypatch.setattr(time, "get_clock_info", other_clock)
    with pytest.raises(RuntimeError, match="CLOCK_MONOTONIC"):
        check_clock()


# --- split runs against a server -----------------------------------------------------------


def test_open_loop_in_two_processes_sends_each_intended_start_once(serve: Serve, tmp_path: Path) -> None:
    server = serve(sim_ttft_ms=5)
    config = LoadConfig(requests=20, rate=40, arrival="constant", processes=2)
    result = run_load_test(ChatsseTarget(server.url), config)
    records = result.records
    assert [r.request_id for r in records] == list(range(20))
    assert all(r.ok for r in records)
    offsets = sorted(r.intended_start - result.start for r in records)
    assert offsets == pytest.approx([i * 0.025 for i in range(20)], abs=1e-9)  # the schedule, once each
    assert all(r.sent >= r.intended_start for r in records)
    assert len(result.client) == 2
    assert len({c.pid for c in result.client} | {os.getpid()}) == 3  # two other processes
    assert result.summary().completed == 20
    assert result.end >= max(r.end or 0 for r in records)
    path = tmp_path / "split.json"  # one result, like any other
    result.save(path)
    loaded = LoadTestResult.load(path)
    assert loaded == result
    assert [c.index for c in loaded.client] == [0, 1]
    assert loaded.summary() == result.summary()


def test_closed_loop_in_two_processes_keeps_the_bound_and_the_cap(serve: Serve) -> None:
    server = serve(sim_ttft_ms=20)
    config = LoadConfig(requests=15, concurrency=4, turns=3, max_concurrency=2, processes=2)
    result = run_load_test(ChatsseTarget(server.url), config)
    records = result.records
    assert len(records) == 15  # the request bound holds across the processes
    assert [r.request_id for r in records] == list(range(15))
    assert all(r.ok for r in records)
    assert max_in_flight(records) <= 2
    by_user: dict[int, list[RequestRecord]] = {}
    for r in records:
        by_user.setdefault(r.user_id, []).append(r)
    for turns in by_user.values():  # each user's turns in order, in one conversation
        assert [r.turn for r in turns] == list(range(len(turns)))
    # At least 15 / 3 conversations. (User ids are unique, not dense: a conversation that
    # was still waiting for a slot when the bound was reached took an id and sent nothing.)
    assert len(by_user) >= 5


def test_progress_adds_up_the_processes(serve: Serve) -> None:
    server = serve(sim_ttft_ms=100)
    seen: list[Progress] = []
    config = LoadConfig(requests=8, concurrency=4, processes=2)
    run_load_test(ChatsseTarget(server.url), config, progress=seen.append, progress_interval=0.05)
    assert seen[-1].finished
    assert (seen[-1].sent, seen[-1].completed, seen[-1].failed) == (8, 8, 0)
    assert any(p.open_streams > 2 for p in seen[:-1])  # more streams than either process had


def test_cancelling_a_split_run_keeps_every_record(serve: Serve) -> None:
    server = serve(
        sim_ttft_ms=0, sim_token_interval_ms=50, sim_reply_tokens_min=200, sim_reply_tokens_max=200
    )
    config = LoadConfig(requests=100, concurrency=4, processes=2)

    def streaming() -> bool:
        return bool(httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 4)

    async def interrupt() -> LoadTestResult:
        task = asyncio.create_task(arun_load_test(ChatsseTarget(server.url), config))
        assert await asyncio.to_thread(wait_for, streaming, 60, 0.05)
        task.cancel()
        return await task

    result = asyncio.run(interrupt())
    assert result.interrupted
    assert len(result.records) == 4
    assert [r.error for r in result.records] == ["cancelled"] * 4
    assert all(r.token_times for r in result.records)
    assert len(result.client) == 2


def test_a_bug_in_a_worker_is_raised_in_the_parent(serve: Serve) -> None:
    with pytest.raises(RuntimeError, match="bug in a target"):
        run_load_test(BrokenTarget(serve().url), LoadConfig(requests=4, concurrency=2, processes=2))


class LocalTarget(ChatsseTarget):
    pass


def test_a_target_class_the_workers_cannot_import_is_refused() -> None:
    LocalTarget.__module__ = "__main__"  # as if defined in a script or a notebook cell
    with pytest.raises(ValueError, match="must be importable"):
        run_load_test(LocalTarget("http://127.0.0.1:9"), LoadConfig(requests=1, processes=2, concurrency=2))
