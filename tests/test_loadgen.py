"""Load shapes against real chatsse servers, and what a run's result holds.

Machine speed varies, so timing checks only bound in the generous direction: a send is
never *before* its schedule, and late by at most a generous margin; a run ends within
its bound plus slack.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import statistics
from pathlib import Path

import httpx
import pytest
from conftest import Serve
from fake_openai import FakeOpenAI
from load_support import BlockingTarget, BrokenTarget, max_in_flight
from support import FailingEngine

from chatsse.inprocess import InProcessServer
from chatsse.loadgen import (
    DATAFRAME_COLUMNS,
    LoadConfig,
    LoadTestResult,
    Progress,
    arrival_times,
    arun_load_test,
    load_results,
    run_load_test,
    run_single_request,
    run_sweep,
    save_sweep,
    sweep_configs,
)
from chatsse.loadhealth import CPU_SHARE_LIMIT, LAG_P99_LIMIT
from chatsse.loadmetrics import SLO, RequestRecord
from chatsse.loadtargets import ChatsseTarget, Conversation, OpenAITarget, Target

SLACK = 3.0  # seconds a busy machine may add to a run's end


# --- arrival times ------------------------------------------------------------------------


def test_arrival_times_are_seeded() -> None:
    a = arrival_times(10, count=50, seed=1)
    assert a == arrival_times(10, count=50, seed=1)
    assert a != arrival_times(10, count=50, seed=2)
    assert a[0] == 0.0
    assert a == sorted(a)


def test_constant_arrivals_are_evenly_spaced() -> None:
    assert arrival_times(4, count=5, arrival="constant") == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(("arrival", "burstiness", "cv2"), [("poisson", 1.0, 1.0), ("gamma", 0.25, 4.0)])
def test_gap_statistics_match_the_process(arrival: str, burstiness: float, cv2: float) -> None:
    times = arrival_times(
        50,
        count=20_001,
        arrival=arrival,
        burstiness=burstiness,
        seed=3,  # type: ignore[arg-type]
    )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 50, rel=0.05)
    # Squared coefficient of variation of gamma(k) gaps is 1/k.
    assert statistics.pvariance(gaps) / mean**2 == pytest.approx(cv2, rel=0.15)


def test_horizon_and_count_bound_the_schedule() -> None:
    assert max(arrival_times(100, horizon=2.0, seed=0)) < 2.0
    assert len(arrival_times(100, count=7, horizon=100.0)) == 7
    assert arrival_times(math.inf, count=3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="count or a horizon"):
        arrival_times(1.0)


def test_ramp_up_raises_the_rate_linearly() -> None:
    # Over a 10 s ramp to 100/s the expected arrivals by t are 100 t^2 / 20: 125 by 5 s,
    # 500 by 10 s, then 100 per second.
    times = arrival_times(100, horizon=12.0, arrival="constant", ramp_up=10.0)
    assert sum(t < 5 for t in times) == pytest.approx(125, abs=2)
    assert sum(t < 10 for t in times) == pytest.approx(500, abs=2)
    assert len(times) == pytest.approx(700, abs=2)


def test_config_needs_a_bound_and_checks_values() -> None:
    with pytest.raises(ValueError, match="needs a bound"):
        LoadConfig()
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig(requests=1, concurrency=0)
    with pytest.raises(ValueError, match="arrival"):
        LoadConfig(requests=1, arrival="uniform")  # type: ignore[arg-type]
    config = LoadConfig(requests=5, rate=2, max_concurrency=3, turns=2, think_time=1)
    assert config.label == "rate 2/s"
    assert config.describe() == (
        "open loop, 2 users/s, poisson arrivals, max concurrency 3, "
        "2 turns per user, think time 1 s, until 5 requests"
    )


# --- closed loop --------------------------------------------------------------------------


def test_closed_loop_sends_the_requests_with_fixed_concurrency(serve: Serve) -> None:
    server = serve(sim_ttft_ms=10)
    result = run_load_test(ChatsseTarget(server.url), LoadConfig(requests=24, concurrency=4))
    assert len(result.records) == 24
    assert all(r.ok for r in result.records)
    assert sorted(r.request_id for r in result.records) == list(range(24))
    assert max_in_flight(result.records) <= 4
    assert all(r.intended_start == r.sent for r in result.records)  # closed loop: never late
    assert not result.interrupted


def test_closed_loop_ramp_up_starts_users_in_turn(serve: Serve) -> None:
    # Replies take over 0.7 s, so each user's first request is one of the first four sent.
    server = serve(sim_ttft_ms=700)
    result = run_load_test(ChatsseTarget(server.url), LoadConfig(requests=4, concurrency=4, ramp_up=0.6))
    sends = sorted(r.sent - result.start for r in result.records)
    for i, sent in enumerate(sends):
        assert sent >= 0.15 * i - 0.001
    assert sends[-1] < 0.45 + SLACK


def test_duration_bounds_the_sending_and_in_flight_requests_drain(serve: Serve) -> None:
    server = serve(sim_ttft_ms=20)
    config = LoadConfig(duration=0.6, concurrency=3, drain_timeout=5)
    result = run_load_test(ChatsseTarget(server.url), config)
    assert len(result.records) > 3
    assert all(r.sent < result.start + 0.6 for r in result.records)
    assert all(r.ok for r in result.records)  # the drain let the last ones finish
    assert 0.6 <= result.duration <= 0.6 + 5 + SLACK


def test_rates_of_a_duration_bound_run_divide_by_the_sending_window(serve: Serve) -> None:
    # Replies of about 0.3 s: the three requests in flight when sending stops at 0.5 s end
    # in the drain; they count as completed, but not in the rates over the 0.5 s window.
    server = serve(sim_ttft_ms=0, sim_token_interval_ms=30, sim_reply_tokens_min=10, sim_reply_tokens_max=10)
    config = LoadConfig(duration=0.5, concurrency=3, drain_timeout=5)
    result = run_load_test(ChatsseTarget(server.url, max_tokens=10), config)
    assert result.window == pytest.approx(0.5)
    assert result.duration > result.window
    summary = result.summary()
    assert summary.duration == pytest.approx(0.5)
    in_window = [r for r in result.records if r.ok and r.end is not None and r.end <= result.start + 0.5]
    assert summary.completed == len(result.records)
    assert summary.drained == summary.completed - len(in_window) >= 3
    assert summary.request_throughput == pytest.approx(len(in_window) / 0.5)
    assert summary.output_token_throughput == pytest.approx(sum(r.tokens for r in in_window) / 0.5)


def test_requests_still_streaming_after_the_drain_are_cancelled(serve: Serve) -> None:
    # Replies of 50 tokens at 100 ms: none finishes within the 0.3 s run plus 0.3 s drain.
    server = serve(sim_ttft_ms=0, sim_token_interval_ms=100, sim_reply_tokens_min=50, sim_reply_tokens_max=50)
    config = LoadConfig(duration=0.3, concurrency=2, drain_timeout=0.3)
    result = run_load_test(ChatsseTarget(server.url, max_tokens=50), config)
    assert len(result.records) == 2
    assert [r.error for r in result.records] == ["cancelled", "cancelled"]
    assert all(r.token_times for r in result.records)  # they were streaming
    assert 0.6 <= result.duration <= 0.6 + SLACK
    assert not result.interrupted


# --- open loop ----------------------------------------------------------------------------


def test_open_loop_sends_on_schedule(serve: Serve) -> None:
    server = serve()
    config = LoadConfig(requests=10, rate=20, arrival="constant")
    result = run_load_test(ChatsseTarget(server.url), config)
    records = sorted(result.records, key=lambda r: r.request_id)
    offsets = [r.intended_start - result.start for r in records]
    assert offsets == pytest.approx([i * 0.05 for i in range(10)], abs=1e-9)
    for r in records:
        assert 0 <= r.lateness < 0.25
    assert all(r.ok for r in records)


def test_open_loop_cap_makes_requests_wait_and_reports_lateness(serve: Serve) -> None:
    # Arrivals every 10 ms, one request at a time, each taking at least 100 ms (the TTFT):
    # request k cannot be sent before k * 100 ms, so it is at least k * 90 ms late, nearly
    # all of it waiting for the slot.
    server = serve(sim_ttft_ms=100)
    config = LoadConfig(requests=6, rate=100, arrival="constant", max_concurrency=1, slo=SLO(ttft=0.3))
    result = run_load_test(ChatsseTarget(server.url), config)
    records = sorted(result.records, key=lambda r: r.request_id)
    assert all(r.ok for r in records)
    assert max_in_flight(records) == 1
    for k, r in enumerate(records):
        assert r.lateness >= 0.09 * k - 0.001
        assert 0 <= r.slot_wait <= r.lateness
    summary = result.summary()
    assert summary.lateness is not None
    assert summary.lateness.max >= 0.45
    assert summary.e2e_intended is not None
    assert summary.e2e is not None
    assert summary.e2e_intended.max > summary.e2e.max
    assert summary.slot_wait is not None
    assert summary.slot_wait.max > 0
    # Every TTFT from the send is about 0.1 s, within the SLO; the last requests also
    # waited most of 0.45 s for their slot, so from when they were due they missed it.
    assert summary.good_from_send > summary.good
    assert summary.goodput_from_send > summary.goodput


def test_closed_loop_users_waiting_for_a_slot_record_it_on_every_turn(serve: Serve) -> None:
    # Three users, two turns each without think time, one slot: a user's second turn is
    # due when its first ends, and waits while another user holds the slot.
    server = serve(sim_ttft_ms=30)
    config = LoadConfig(requests=6, concurrency=3, turns=2, max_concurrency=1)
    result = run_load_test(ChatsseTarget(server.url), config)
    records = result.records
    assert all(r.ok for r in records)
    assert max_in_flight(records) == 1
    assert all(0 <= r.slot_wait == pytest.approx(r.lateness) for r in records)
    assert any(r.turn == 1 and r.slot_wait > 0 for r in records)
    summary = result.summary()
    assert summary.slot_wait is not None
    assert summary.lateness is not None


def test_closed_loop_without_waits_has_no_intended_rows(serve: Serve) -> None:
    result = run_load_test(ChatsseTarget(serve().url), LoadConfig(requests=6, concurrency=2))
    summary = result.summary()
    assert (summary.e2e_intended, summary.lateness, summary.slot_wait) == (None, None, None)
    assert summary.good == summary.good_from_send == 6


def test_open_loop_duration_counts_requests_left_waiting_for_a_slot(serve: Serve) -> None:
    server = serve(sim_ttft_ms=200)
    config = LoadConfig(duration=0.5, rate=40, arrival="constant", max_concurrency=1, drain_timeout=5)
    result = run_load_test(ChatsseTarget(server.url), config)
    assert 1 <= len(result.records) <= 3
    assert result.unsent == 20 - len(result.records)
    assert all(r.ok for r in result.records)


# --- multi-turn ---------------------------------------------------------------------------


def _conversations(url: str) -> list[list[dict[str, object]]]:
    listing = httpx.get(f"{url}/conversations").json()["conversations"]
    return [httpx.get(f"{url}/conversations/{c['id']}").json()["messages"] for c in listing]


def test_closed_loop_multi_turn_users_share_one_conversation(serve: Serve) -> None:
    server = serve(max_reply_tokens=5)
    config = LoadConfig(requests=9, concurrency=3, turns=3, think_time=0.05)
    result = run_load_test(ChatsseTarget(server.url), config)
    assert len(result.records) == 9
    assert all(r.ok for r in result.records)
    by_user: dict[int, list[RequestRecord]] = {}
    for r in result.records:
        by_user.setdefault(r.user_id, []).append(r)
    # Usually three users of three turns each; on a busy machine a user that got ahead finishes
    # its three and starts a fourth while another is still on its second.
    assert sorted(by_user)[:3] == [0, 1, 2]
    assert max(len(turns) for turns in by_user.values()) == 3
    for turns in by_user.values():
        assert [r.turn for r in turns] == list(range(len(turns)))  # at most three, in order
        for before, after in itertools.pairwise(turns):
            assert before.end is not None
            assert after.intended_start == pytest.approx(before.end + 0.05)
            assert after.sent >= after.intended_start
    # Each user's turns went into one conversation of its own.
    conversations = _conversations(server.url)
    assert sorted(len(messages) for messages in conversations) == sorted(2 * len(t) for t in by_user.values())


def test_open_loop_multi_turn_users(serve: Serve) -> None:
    server = serve()
    config = LoadConfig(requests=6, rate=20, arrival="constant", turns=2)
    result = run_load_test(ChatsseTarget(server.url), config)
    assert len(result.records) == 6
    assert sorted((r.user_id, r.turn) for r in result.records) == [(u, t) for u in range(3) for t in range(2)]
    conversations = _conversations(server.url)
    assert sorted(len(m) for m in conversations) == [4, 4, 4]


def test_openai_target_multi_turn_keeps_the_history() -> None:
    fake = FakeOpenAI()
    with InProcessServer(fake.app()) as server:
        # Two users arriving at once, two turns each.
        config = LoadConfig(requests=4, rate=math.inf, turns=2)
        result = run_load_test(OpenAITarget(server.url), config)
    assert all(r.ok for r in result.records)
    assert result.target["model"] == "fake-model"
    assert sorted(len(body["messages"]) for body in fake.bodies) == [1, 1, 3, 3]


# --- failures -----------------------------------------------------------------------------


def test_errors_are_counted_by_type(serve: Serve) -> None:
    busy = serve(max_streams_per_worker=2, sim_ttft_ms=300)
    result = run_load_test(ChatsseTarget(busy.url), LoadConfig(requests=4, concurrency=4))
    assert sorted(r.error or "ok" for r in result.records) == ["http_503", "http_503", "ok", "ok"]
    failing = serve(engine=FailingEngine(good_tokens=2))
    result = run_load_test(ChatsseTarget(failing.url), LoadConfig(requests=3, concurrency=1))
    assert result.summary().errors_by_type == {"stream_error:engine_error": 3}
    assert result.error_rate == 1.0


def test_cancelling_the_run_keeps_the_records(serve: Serve) -> None:
    server = serve(sim_ttft_ms=0, sim_token_interval_ms=50, sim_reply_tokens_min=60, sim_reply_tokens_max=60)
    config = LoadConfig(requests=100, concurrency=3)

    async def interrupt() -> LoadTestResult:
        task = asyncio.create_task(arun_load_test(ChatsseTarget(server.url), config))
        await asyncio.sleep(0.4)
        task.cancel()
        return await task

    result = asyncio.run(interrupt())
    assert result.interrupted
    assert len(result.records) == 3
    assert [r.error for r in result.records] == ["cancelled"] * 3
    assert all(r.end is not None and r.token_times for r in result.records)


def test_a_bug_in_a_target_is_raised_not_hidden(serve: Serve) -> None:
    target: Target = BrokenTarget(serve().url)
    with pytest.raises(RuntimeError, match="bug in a target"):
        run_load_test(target, LoadConfig(requests=3, concurrency=2))


# --- the client's self-check -------------------------------------------------------------


def test_a_blocked_client_is_flagged_and_an_idle_one_is_not(serve: Serve) -> None:
    # The server runs in this process: a quiet one (a few tokens, far apart), warmed up
    # first, so that it rarely holds the interpreter while the client's loop would run.
    server = serve(sim_ttft_ms=300, sim_token_interval_ms=100)
    target = ChatsseTarget(server.url, max_tokens=3)
    run_load_test(target, LoadConfig(requests=1))
    # Idle: one user waiting 0.5 s for each reply, about 150 ticks. A busy machine can keep
    # even an idle client from its CPU for longer than the limit (and the self-check then says
    # so, rightly): up to three runs, of which one must come out clean.
    lags: list[float] = []
    for _ in range(3):
        idle = run_load_test(target, LoadConfig(requests=3, concurrency=1))
        (client,) = idle.client
        assert client.ticks > 100
        lags.append(client.loop_lag_p99)
        if client.loop_lag_p99 < LAG_P99_LIMIT and client.cpu_share < CPU_SHARE_LIMIT:
            assert idle.client_warnings() == []
            break
    else:
        raise AssertionError(f"an idle client was flagged in three runs: loop lag p99 {lags}")
    # Blocked: each request first stalls the loop for 0.1 s, so the ticker wakes late.
    blocked = run_load_test(BlockingTarget(server.url, max_tokens=3), LoadConfig(requests=6, concurrency=2))
    (client,) = blocked.client
    assert client.loop_lag_max >= 0.09
    assert client.loop_lag_p99 >= LAG_P99_LIMIT
    assert any("event loop woke" in warning for warning in blocked.client_warnings())


# --- sweeps, progress, single requests ----------------------------------------------------


def test_sweep_runs_one_load_test_per_level(serve: Serve) -> None:
    server = serve()
    results = run_sweep(ChatsseTarget(server.url), LoadConfig(requests=4), rates=[20, 40])
    assert [r.config.rate for r in results] == [20, 40]
    assert [len(r.records) for r in results] == [4, 4]
    configs = sweep_configs(LoadConfig(requests=1, rate=3), concurrencies=[1, 8])
    assert [(c.rate, c.concurrency) for c in configs] == [(None, 1), (None, 8)]
    with pytest.raises(ValueError, match="exactly one"):
        sweep_configs(LoadConfig(requests=1))


def test_progress_reports_while_running_and_gc_is_paused_meanwhile(serve: Serve) -> None:
    server = serve(sim_ttft_ms=100)
    seen: list[Progress] = []
    gc_enabled: list[bool] = []

    def report(progress: Progress) -> None:
        seen.append(progress)
        gc_enabled.append(gc.isenabled())

    assert gc.isenabled()
    run_load_test(
        ChatsseTarget(server.url),
        LoadConfig(requests=6, concurrency=2),
        progress=report,
        progress_interval=0.05,
    )
    assert gc.isenabled()
    assert not any(gc_enabled[:-1])  # paused during the run, back on for the final report
    assert len(seen) >= 3
    assert seen[-1].finished
    assert (seen[-1].sent, seen[-1].completed, seen[-1].failed, seen[-1].open_streams) == (6, 6, 0, 0)
    assert any(p.open_streams > 0 for p in seen[:-1])


def test_single_request_streams_text(serve: Serve) -> None:
    parts: list[str] = []
    record = run_single_request(ChatsseTarget(serve().url, max_tokens=5), "hi", on_text=parts.append)
    assert record.ok
    assert len(parts) == 5


# --- results ------------------------------------------------------------------------------


@pytest.fixture
def finished_run(serve: Serve) -> LoadTestResult:
    failing_after_two = serve(engine=FailingEngine(good_tokens=2))
    ok_server = serve(sim_ttft_ms=5)
    config = LoadConfig(requests=6, concurrency=2, turns=2, slo=SLO(ttft=10.0))
    good = run_load_test(ChatsseTarget(ok_server.url), config)
    bad = run_load_test(ChatsseTarget(failing_after_two.url), LoadConfig(requests=2))
    good.records.extend(bad.records)
    return good


def test_summary_agrees_with_the_records(finished_run: LoadTestResult) -> None:
    records = finished_run.records
    summary = finished_run.summary()
    ok = [r for r in records if r.ok]
    assert (summary.completed, summary.failed) == (6, 2)
    assert summary.total_output_tokens == sum(r.tokens for r in ok)
    assert summary.total_input_tokens == sum(r.prompt_tokens or 0 for r in ok)
    assert summary.duration == finished_run.duration
    assert summary.slo == SLO(ttft=10.0)
    assert summary.good == 6
    assert finished_run.summary(SLO(ttft=1e-9)).good == 0
    assert summary.ttft is not None
    assert summary.ttft.max == max(r.ttft for r in ok if r.ttft is not None)


def test_save_and_load_round_trip(finished_run: LoadTestResult, tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    finished_run.save(path)
    loaded = LoadTestResult.load(path)
    assert loaded == finished_run
    assert loaded.summary() == finished_run.summary()
    document = finished_run.to_dict()
    for key in (
        "completed",
        "failed",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "p99_itl_ms",
    ):
        assert key in document
    assert len(document["ttfts"]) == len(document["itls"]) == len(document["output_lens"]) == 8
    assert document["errors"].count("") == 6
    assert document["errors_by_type"] == {"stream_error:engine_error": 2}
    sweep_path = tmp_path / "sweep.json"
    save_sweep([finished_run, finished_run], sweep_path)
    assert load_results(sweep_path) == [finished_run, finished_run]
    assert load_results(path) == [finished_run]


def test_to_dataframe_has_one_row_per_request(finished_run: LoadTestResult) -> None:
    frame = finished_run.to_dataframe()
    assert list(frame.columns) == list(DATAFRAME_COLUMNS)
    assert len(frame) == 8
    assert frame["ok"].sum() == 6
    first = finished_run.records[0]
    row = frame.iloc[0]
    assert row["sent"] == pytest.approx(first.sent - finished_run.start)
    assert row["ttft"] == pytest.approx(first.ttft)
    assert row["tokens"] == first.tokens


def test_conversation_state_is_per_user() -> None:
    assert Conversation() == Conversation()
    assert Conversation().history is not Conversation().history
