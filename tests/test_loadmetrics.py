"""Tests for load-test metrics on small hand-built timelines.

Every expected value is derived by hand in the comments next to it.
"""

from __future__ import annotations

import math

import pytest

from chatsse.loadmetrics import SLO, RequestRecord, Stats, percentile, summarize, timeline

approx = pytest.approx


def record(
    request_id: int,
    *,
    intended: float,
    sent: float,
    tokens_at: list[float],
    end: float | None,
    tokens: int | None = None,
    events: int | None = None,
    status: int | None = 200,
    error: str | None = None,
    prompt_tokens: int | None = None,
    slot_wait: float = 0.0,
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        user_id=0,
        turn=0,
        intended_start=intended,
        sent=sent,
        headers_at=sent + 0.01 if status is not None else None,
        first_token_at=tokens_at[0] if tokens_at else None,
        token_times=list(tokens_at),
        end=end,
        events=len(tokens_at) if events is None else events,
        tokens=len(tokens_at) if tokens is None else tokens,
        bytes_received=100 * len(tokens_at),
        status=status,
        error=error,
        prompt_tokens=prompt_tokens,
        slot_wait=slot_wait,
    )


def run() -> list[RequestRecord]:
    """Three completed and three failed requests over a 10 s run.

    r1: on time; 4 content events, usage says 4 tokens; 6 events with usage+[DONE].
    r2: 0.5 s late; 2 content events carrying 5 tokens (usage).
    r3: on time; a single token.
    r4, r6: HTTP 503. r5: timed out after two tokens.
    """
    return [
        record(
            1,
            intended=0.0,
            sent=0.0,
            tokens_at=[0.1, 0.2, 0.4, 0.5],
            end=0.6,
            events=6,
            prompt_tokens=10,
        ),
        record(2, intended=1.0, sent=1.5, tokens_at=[1.8, 2.1], end=2.2, tokens=5, prompt_tokens=20),
        record(3, intended=2.0, sent=2.0, tokens_at=[2.2], end=2.25, events=2),
        record(4, intended=3.0, sent=3.25, tokens_at=[], end=3.3, status=503, error="http_503"),
        record(5, intended=4.0, sent=4.0, tokens_at=[4.5, 6.0], end=9.0, error="timeout"),
        record(6, intended=5.0, sent=5.0, tokens_at=[], end=5.1, status=503, error="http_503"),
    ]


# --- per-request properties --------------------------------------------------


def test_request_properties() -> None:
    r1, r2, r3, r4, r5, _ = run()
    assert r1.ok
    assert r1.ttft == approx(0.1)
    assert r1.e2e == approx(0.6)
    assert r1.e2e_intended == approx(0.6)
    assert r1.lateness == 0.0
    assert r1.itls == approx([0.1, 0.2, 0.1])
    # (0.5 - 0.1) / (4 - 1)
    assert r1.tpot == approx(0.4 / 3)

    assert r2.ttft == approx(0.3)  # 1.8 - 1.5
    assert r2.e2e == approx(0.7)  # 2.2 - 1.5
    assert r2.e2e_intended == approx(1.2)  # 2.2 - 1.0
    assert r2.lateness == approx(0.5)
    assert r2.itls == approx([0.3])
    # 5 server-reported tokens over 2 events: (2.1 - 1.8) / (5 - 1)
    assert r2.tpot == approx(0.075)

    assert r3.tpot is None  # one token: no TPOT
    assert r3.itls == []

    assert not r4.ok
    assert r4.ttft is None
    assert not r5.ok  # status 200 but an error


def test_ok_needs_status_200() -> None:
    assert not record(1, intended=0, sent=0, tokens_at=[0.1], end=0.2, status=None).ok
    assert not record(1, intended=0, sent=0, tokens_at=[0.1], end=0.2, status=201).ok


def test_tpot_ignores_time_after_last_token() -> None:
    # Trailing usage/[DONE] events until end=5.0 do not count: (1.3 - 1.0) / 3.
    r = record(1, intended=0, sent=0, tokens_at=[1.0, 1.1, 1.2, 1.3], end=5.0)
    assert r.tpot == approx(0.1)


def test_missing_end_gives_no_e2e() -> None:
    r = record(1, intended=0.0, sent=0.5, tokens_at=[1.0], end=None)
    assert r.e2e is None
    assert r.e2e_intended is None
    assert r.lateness == 0.5


# --- percentiles and stats ------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),  # rank 1.5: 2 + 0.5 * (3 - 2)
        ([10.0, 20.0, 30.0, 40.0, 50.0], 90, 46.0),  # rank 3.6: 40 + 0.6 * 10
        ([50.0, 10.0, 40.0, 20.0, 30.0], 90, 46.0),  # input order does not matter
        ([10.0, 20.0, 30.0, 40.0, 50.0], 25, 20.0),  # rank 1.0 exactly
        ([1.0, 2.0, 3.0, 4.0], 99, 3.97),  # rank 2.97: 3 + 0.97
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([7.0], 99, 7.0),
        ([0.0, 100.0], 95, 95.0),  # rank 0.95
    ],
)
def test_percentile_linear_interpolation(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == approx(expected)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_stats_of_known_series() -> None:
    stats = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert stats is not None
    assert stats.mean == approx(2.5)
    # population variance: (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert stats.std == approx(math.sqrt(1.25))
    assert stats.median == approx(2.5)
    assert stats.p50 == approx(2.5)
    assert stats.p90 == approx(3.7)  # rank 2.7
    assert stats.p95 == approx(3.85)  # rank 2.85
    assert stats.p99 == approx(3.97)  # rank 2.97
    assert (stats.min, stats.max, stats.count) == (1.0, 4.0, 4)


def test_stats_of_empty_series_is_none() -> None:
    assert Stats.of([]) is None


# --- summary -----------------------------------------------------------------------


def test_counts_and_throughputs() -> None:
    s = summarize(run(), duration=10.0)
    assert (s.completed, s.failed) == (3, 3)
    assert s.errors_by_type == {"http_503": 2, "timeout": 1}
    assert s.duration == 10.0
    assert s.request_throughput == approx(0.3)
    # tokens of completed requests: 4 + 5 + 1 = 10 (r5's two are not counted)
    assert s.total_output_tokens == 10
    assert s.output_token_throughput == approx(1.0)
    # events of completed requests: 6 + 2 + 2 = 10
    assert s.total_events == 10
    assert s.event_throughput == approx(1.0)
    assert s.total_input_tokens == 30


def test_ttft_stats_exclude_failed_requests() -> None:
    ttft = summarize(run(), duration=10.0).ttft
    # r1 0.1, r2 0.3, r3 0.2; failed r5's 0.5 is excluded. Sorted [0.1, 0.2, 0.3].
    assert ttft is not None
    assert ttft.count == 3
    assert ttft.mean == approx(0.2)
    assert ttft.median == approx(0.2)
    assert ttft.std == approx(math.sqrt(0.02 / 3))  # deviations -0.1, 0, 0.1
    assert ttft.p90 == approx(0.28)  # rank 1.8: 0.2 + 0.8 * 0.1
    assert ttft.p95 == approx(0.29)
    assert ttft.p99 == approx(0.298)
    assert [ttft.min, ttft.max] == approx([0.1, 0.3])


def test_tpot_stats() -> None:
    tpot = summarize(run(), duration=10.0).tpot
    # r1 0.4/3, r2 0.075; r3 has a single token and no TPOT.
    assert tpot is not None
    assert tpot.count == 2
    assert tpot.mean == approx((0.4 / 3 + 0.075) / 2)
    assert tpot.std == approx((0.4 / 3 - 0.075) / 2)
    assert tpot.p90 == approx(0.075 + 0.9 * (0.4 / 3 - 0.075))


def test_itl_is_pooled_over_requests() -> None:
    itl = summarize(run(), duration=10.0).itl
    # r1 gaps 0.1, 0.2, 0.1 and r2 gap 0.3 (not failed r5's 1.5) -> sorted [0.1, 0.1, 0.2, 0.3]
    assert itl is not None
    assert itl.count == 4
    assert itl.mean == approx(0.175)
    assert itl.median == approx(0.15)  # rank 1.5
    assert itl.p90 == approx(0.27)  # rank 2.7: 0.2 + 0.7 * 0.1
    assert itl.p99 == approx(0.297)
    # squared deviations 0.005625 * 2 + 0.000625 + 0.015625 = 0.0275, / 4
    assert itl.std == approx(math.sqrt(0.006875))


def test_e2e_and_intended_e2e_stats() -> None:
    s = summarize(run(), duration=10.0)
    assert s.e2e is not None
    assert s.e2e_intended is not None
    # e2e: 0.6, 0.7, 0.25; intended adds r2's 0.5 s lateness: 0.6, 1.2, 0.25
    assert s.e2e.mean == approx(1.55 / 3)
    assert s.e2e.median == approx(0.6)
    assert s.e2e.max == approx(0.7)
    assert s.e2e_intended.mean == approx(2.05 / 3)
    assert s.e2e_intended.max == approx(1.2)


def test_lateness_counts_every_sent_request() -> None:
    lateness = summarize(run(), duration=10.0).lateness
    # all six: 0, 0.5, 0, 0.25, 0, 0 -> sorted [0, 0, 0, 0, 0.25, 0.5]
    assert lateness is not None
    assert lateness.count == 6
    assert lateness.mean == approx(0.125)
    assert lateness.median == approx(0.0)
    assert lateness.p90 == approx(0.375)  # rank 4.5: 0.25 + 0.5 * 0.25
    assert lateness.max == approx(0.5)


def test_rates_count_only_requests_completed_in_the_window() -> None:
    # A window ending at 2.1: r1 (end 0.6) is in it; r2 (2.2) and r3 (2.25) completed in
    # the drain after it.
    s = summarize(run(), duration=2.1, until=2.1)
    assert (s.completed, s.drained) == (3, 2)
    assert s.request_throughput == approx(1 / 2.1)
    assert s.output_token_throughput == approx(4 / 2.1)
    assert s.event_throughput == approx(6 / 2.1)
    assert s.input_token_throughput == approx(10 / 2.1)
    assert s.total_token_throughput == approx(14 / 2.1)
    assert s.goodput == approx(1 / 2.1)
    assert s.good == 3  # the SLO test covers every completed request
    assert s.total_output_tokens == 10  # totals too
    assert s.ttft is not None
    assert s.ttft.count == 3  # and the latency statistics


def test_goodput_counts_the_slot_wait() -> None:
    # r1 was due at -0.2 and waited those 0.2 s for a slot: TTFT 0.1 from send, 0.3 from
    # when it was due.
    records = run()
    records[0] = record(1, intended=-0.2, sent=0.0, tokens_at=[0.1, 0.2], end=0.6, slot_wait=0.2)
    s = summarize(records, duration=10.0, slo=SLO(ttft=0.25))
    # from send: r1 (0.1) and r3 (0.2) meet it, r2 (0.3) does not; from its intended start, r1 fails.
    assert (s.good_from_send, s.good) == (2, 1)
    assert s.goodput_from_send == approx(0.2)
    assert s.goodput == approx(0.1)
    assert s.good_fraction == approx(1 / 6)
    assert s.good_fraction_from_send == approx(2 / 6)
    assert s.slot_wait is not None
    assert (s.slot_wait.count, s.slot_wait.max, s.slot_wait.mean) == (6, approx(0.2), approx(0.2 / 6))
    e2e = SLO(e2e=0.7)  # r1's E2E: 0.6 from send, 0.8 from its intended start
    assert e2e.met_by(records[0])
    assert not e2e.met_by(records[0], from_intended_start=True)
    # Late without a slot to wait for (a client behind its schedule): the user waited all the same.
    lagging = record(1, intended=-0.2, sent=0.0, tokens_at=[0.1, 0.2], end=0.6)
    assert e2e.met_by(lagging)
    assert not e2e.met_by(lagging, from_intended_start=True)


def test_rows_identical_by_construction_are_left_out() -> None:
    # Every request sent at its intended start and none waiting for a slot (a closed loop):
    # intended E2E would repeat E2E, lateness and slot wait would be all zeros.
    on_time = [
        record(1, intended=0.0, sent=0.0, tokens_at=[0.1], end=0.2),
        record(2, intended=0.5, sent=0.5, tokens_at=[0.6], end=0.7),
    ]
    s = summarize(on_time, duration=1.0)
    assert (s.e2e_intended, s.lateness, s.slot_wait) == (None, None, None)
    assert s.e2e is not None
    d = s.as_dict()
    assert d["p99_lateness_ms"] is None
    assert d["mean_slot_wait_ms"] is None
    late = summarize(run(), duration=10.0)  # r2 and r4 were late, none waited for a slot
    assert late.lateness is not None
    assert late.slot_wait is None


def test_without_slo_every_completed_request_is_good() -> None:
    s = summarize(run(), duration=10.0)
    assert s.good == 3
    assert s.goodput == approx(0.3)
    assert s.good_fraction == approx(0.5)


def test_goodput_with_ttft_and_tpot_slo() -> None:
    s = summarize(run(), duration=10.0, slo=SLO(ttft=0.25, tpot=0.1))
    # r1: TPOT 0.133 > 0.1; r2: TTFT 0.3 > 0.25; r3: TTFT 0.2, no TPOT -> good.
    assert s.good == 1
    assert s.goodput == approx(0.1)
    assert s.good_fraction == approx(1 / 6)


def test_goodput_thresholds_are_inclusive() -> None:
    # r1's e2e is exactly 0.6 - 0.0; r2 0.7 fails; r3 0.25 passes.
    s = summarize(run(), duration=10.0, slo=SLO(e2e=0.6))
    assert s.good == 2


def test_slo_fails_request_without_measured_value() -> None:
    r = record(1, intended=0, sent=0, tokens_at=[], end=1.0)
    assert r.ok
    assert not SLO(ttft=10.0).met_by(r)
    assert SLO(tpot=0.001).met_by(r)


def test_failed_request_is_never_good() -> None:
    s = summarize(run()[3:], duration=1.0, slo=SLO())
    assert (s.good, s.goodput, s.good_fraction) == (0, 0.0, 0.0)


def test_error_type_falls_back_to_status() -> None:
    odd = [
        record(1, intended=0, sent=0, tokens_at=[], end=1.0, status=404),
        record(2, intended=0, sent=0, tokens_at=[], end=1.0, status=None),
    ]
    assert summarize(odd, duration=1.0).errors_by_type == {"http_404": 1, "unknown": 1}


def test_empty_input() -> None:
    s = summarize([], duration=5.0)
    assert (s.completed, s.failed, s.errors_by_type) == (0, 0, {})
    assert (s.request_throughput, s.output_token_throughput, s.goodput) == (0.0, 0.0, 0.0)
    assert s.good_fraction is None
    assert [s.ttft, s.tpot, s.itl, s.e2e, s.e2e_intended, s.lateness] == [None] * 6
    d = s.as_dict()
    assert d["mean_ttft_ms"] is None
    assert d["p99_lateness_ms"] is None


def test_duration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="duration"):
        summarize(run(), duration=0.0)


def test_as_dict_uses_vllm_keys_in_milliseconds() -> None:
    d = summarize(run(), duration=10.0, slo=SLO(ttft=0.25, tpot=0.1)).as_dict()
    assert d["completed"] == 3
    assert d["failed"] == 3
    assert d["duration"] == 10.0
    assert d["request_throughput"] == approx(0.3)
    assert d["output_throughput"] == approx(1.0)
    assert d["goodput"] == approx(0.1)
    assert d["goodput_from_send"] == approx(0.1)
    assert d["drained"] == 0
    assert d["total_token_throughput"] == approx(4.0)  # 30 prompt + 10 output tokens in 10 s
    assert d["errors"] == {"http_503": 2, "timeout": 1}
    assert d["mean_ttft_ms"] == approx(200.0)
    assert d["median_ttft_ms"] == approx(200.0)
    assert d["std_ttft_ms"] == approx(1000 * math.sqrt(0.02 / 3))
    assert d["p50_ttft_ms"] == approx(200.0)
    assert d["p90_ttft_ms"] == approx(280.0)
    assert d["p95_ttft_ms"] == approx(290.0)
    assert d["p99_ttft_ms"] == approx(298.0)
    assert d["mean_tpot_ms"] == approx(1000 * (0.4 / 3 + 0.075) / 2)
    assert d["p99_itl_ms"] == approx(297.0)
    assert d["median_e2el_ms"] == approx(600.0)
    assert d["mean_e2el_intended_ms"] == approx(1000 * 2.05 / 3)
    assert d["mean_lateness_ms"] == approx(125.0)
    assert d["p99_lateness_ms"] == approx(487.5)  # rank 4.95: 0.25 + 0.95 * 0.25
    for series in ("ttft", "tpot", "itl", "e2el", "e2el_intended", "lateness", "slot_wait"):
        for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99"):
            assert f"{stat}_{series}_ms" in d


# --- timeline ----------------------------------------------------------------------


def test_timeline_tokens_per_second_and_open_streams() -> None:
    rows = timeline(run(), bucket=1.0)
    # Last close is r5's end at 9.0 -> buckets starting at 0..9.
    assert [start for start, _, _ in rows] == approx([float(i) for i in range(10)])
    # r1: 4 tokens in [0, 1). r2: 5 tokens over 2 events (2.5 each) at 1.8 and
    # 2.1. r3: 1 at 2.2. r5 (failed, still streamed): 1 at 4.5, 1 at 6.0.
    assert [rate for _, rate, _ in rows] == approx([4.0, 2.5, 3.5, 0, 1.0, 0, 1.0, 0, 0, 0])
    # Open intervals [sent, end): r1 [0, 0.6), r2 [1.5, 2.2), r3 [2, 2.25),
    # r4 [3.25, 3.3), r5 [4, 9), r6 [5, 5.1).
    assert [n for _, _, n in rows] == [1, 0, 2, 0, 1, 2, 1, 1, 1, 0]


def test_timeline_rate_divides_by_bucket_width() -> None:
    r = record(1, intended=10.0, sent=10.0, tokens_at=[10.1, 10.2, 10.3, 10.6], end=10.7)
    # Starts are relative to the first send; 3 tokens in [0, 0.5), 1 in [0.5, 1.0).
    rows = timeline([r], bucket=0.5)
    assert [(start, n) for start, _, n in rows] == [(0.0, 1), (0.5, 1)]
    assert [rate for _, rate, _ in rows] == approx([6.0, 2.0])


def test_timeline_stream_without_end_closes_at_last_activity() -> None:
    r1 = record(1, intended=0.0, sent=0.0, tokens_at=[0.5, 2.5], end=None, error="connection")
    r2 = record(2, intended=0.0, sent=0.0, tokens_at=[], end=4.2)
    rows = timeline([r1, r2], bucket=1.0)
    # r1 open in [0, 2.5); r2 in [0, 4.2).
    assert [n for _, _, n in rows] == [2, 2, 2, 1, 1]


def test_timeline_empty_and_bad_bucket() -> None:
    assert timeline([], bucket=1.0) == []
    with pytest.raises(ValueError, match="bucket"):
        timeline(run(), bucket=0.0)
