"""Little's law on a load run (chatsse/queueing.py): λ and W from the records, L from samples of
the server's open streams; and the sampler, against a real server."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Serve

from chatsse.loadgen import LoadConfig, LoadTestResult
from chatsse.loadmetrics import RequestRecord
from chatsse.queueing import OpenStreamsSampler, littles_law
from chatsse.streamclient import read_chats


def result(spans: list[tuple[float, float | None]]) -> LoadTestResult:
    records = [RequestRecord(request_id=i, user_id=0, turn=0, intended_start=s, sent=s, end=e, status=200)
               for i, (s, e) in enumerate(spans)]  # fmt: skip
    return LoadTestResult(LoadConfig(requests=len(spans)), {}, records, start=0.0, end=10.0, wall_start=0.0)


def in_flight(spans: list[tuple[float, float | None]], at: float) -> int:
    return sum(1 for s, e in spans if e is not None and s <= at < e)


SPANS: list[tuple[float, float | None]] = [
    (0.0, 2.0),
    (1.0, 3.0),
    (1.5, 2.5),
    (2.0, 5.0),
    (4.0, 4.5),
    (4.2, None),
]


def test_samples_of_the_true_count_agree_with_arrival_rate_times_time_in_system() -> None:
    samples = [(t / 100, in_flight(SPANS, t / 100)) for t in range(600)]
    law = littles_law(result(SPANS), samples)
    assert (law.start, law.end) == (0.0, 5.0)
    assert law.arrivals == 5  # the request that never ended is left out
    assert law.arrival_rate == pytest.approx(1.0)
    assert law.mean_time_in_system == pytest.approx((2 + 2 + 1 + 3 + 0.5) / 5)
    assert law.predicted == pytest.approx(1.7)
    assert law.ratio == pytest.approx(1.0, abs=0.02)  # the samples' own error, at 10 ms steps


def test_l_weighs_each_sample_by_how_long_it_held() -> None:
    """A busy server answers its gauge late: one sample then stands for a long stretch."""
    spans: list[tuple[float, float | None]] = [(0.0, 1.0), (0.0, 1.0), (1.0, 3.0)]
    samples = [(0.0, 2), (1.0, 1), (1.1, 1), (1.2, 1), (1.3, 1)]  # the last holds to the end
    law = littles_law(result(spans), samples)
    assert law.mean_in_system == pytest.approx((2 * 1.0 + 1 * 2.0) / 3)
    assert law.predicted == pytest.approx(4 / 3)
    assert law.samples == 5


def test_a_window_counts_the_requests_sent_in_it() -> None:
    samples = [(t / 100, in_flight(SPANS, t / 100)) for t in range(600)]
    law = littles_law(result(SPANS), samples, window=(1.0, 2.5))
    assert law.arrivals == 3
    assert law.duration == 1.5
    assert law.samples == 151


@pytest.mark.parametrize(
    ("spans", "window", "message"),
    [
        ([(0.0, None)], None, "no request"),
        ([(0.0, 1.0)], (2.0, 1.0), "positive"),
        ([(0.0, 1.0)], (5.0, 6.0), "in the window"),
    ],
)
def test_a_window_without_requests_or_samples_is_refused(
    spans: list[tuple[float, float | None]], window: tuple[float, float] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        littles_law(result(spans), [(0.5, 1)], window=window)


def test_the_sampler_sees_the_servers_open_streams(serve: Serve) -> None:
    server = serve(sim_ttft_ms=10, sim_token_interval_ms=20, sim_reply_tokens_min=30, sim_reply_tokens_max=30)

    async def run() -> list[tuple[float, int]]:
        async with OpenStreamsSampler(server.url, every=0.02) as sampler:
            await read_chats(server.url, [(0.0, "one"), (0.0, "two"), (0.0, "three")], max_tokens=30)
            await asyncio.sleep(0.1)
        return sampler.samples

    samples = asyncio.run(run())
    counts = [n for _, n in samples]
    assert max(counts) == 3
    assert counts[-1] == 0
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)


def test_the_sampler_needs_a_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        OpenStreamsSampler("http://127.0.0.1:1", every=0)
