"""The client self-check: the lag histogram, the ticker, and which processes it flags."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatsse.loadhealth import (
    CPU_SHARE_LIMIT,
    LAG_P99_LIMIT,
    ClientProcess,
    LagHistogram,
    LoopWatch,
    saturation_warnings,
)


def test_histogram_quantiles_are_within_a_bucket_and_max_is_exact() -> None:
    lags = LagHistogram()
    for _ in range(990):
        lags.add(0.001)
    for _ in range(10):
        lags.add(0.05)
    lags.add(0.25)
    assert lags.count == 1001
    assert lags.max == 0.25
    assert lags.quantile(0.5) == pytest.approx(0.001, rel=0.021)  # a 2% bucket's upper edge
    assert lags.quantile(0.99) == pytest.approx(0.05, rel=0.021)  # rank 991 is the first 50 ms
    assert lags.quantile(1.0) == 0.25  # capped at the exact max
    assert LagHistogram().quantile(0.99) == 0.0
    with pytest.raises(ValueError, match="quantile"):
        lags.quantile(1.5)


def test_histogram_keeps_tiny_and_huge_lags() -> None:
    lags = LagHistogram()
    lags.add(0.0)
    lags.add(1e9)  # past the last bucket: counted there, and as the max
    assert lags.count == 2
    assert lags.quantile(0.5) <= 1e-5
    assert lags.quantile(1.0) == 1e9
    assert len(lags.counts) == 1024  # memory stays the same whatever is added


def test_watch_measures_a_stalled_loop() -> None:
    async def stall() -> ClientProcess:
        watch = LoopWatch(tick=0.005)
        watch.start()
        for _ in range(5):
            await asyncio.sleep(0.01)
            time.sleep(0.06)  # noqa: ASYNC251 - the stall being measured
        return await watch.stop(index=3)

    client = asyncio.run(stall())
    assert client.index == 3
    assert client.ticks >= 5
    # The ticker cannot wake before a 60 ms stall ends: 5 of its few wake-ups came that late.
    assert client.loop_lag_max >= 0.05
    assert client.loop_lag_p99 >= 0.05
    assert client.wall_seconds >= 0.3


def process(lag_p99: float = 0.001, cpu: float = 0.1, index: int = 0) -> ClientProcess:
    return ClientProcess(
        index=index,
        pid=1,
        wall_seconds=10.0,
        cpu_seconds=10.0 * cpu,
        loop_lag_p99=lag_p99,
        loop_lag_max=0.5,
        ticks=900,
    )


def test_warnings_name_each_limit_reached() -> None:
    assert saturation_warnings([process()]) == []
    (lag,) = saturation_warnings([process(lag_p99=LAG_P99_LIMIT)])
    assert lag.startswith("the client's event loop woke 20.0 ms late at p99")
    (cpu,) = saturation_warnings([process(cpu=CPU_SHARE_LIMIT)])
    assert cpu == "the client used 90% of a core (limit 90%)"
    both = saturation_warnings([process(index=0), process(lag_p99=0.1, cpu=1.0, index=1)])
    assert len(both) == 2
    assert all(w.startswith("client process 1") for w in both)


def test_client_process_round_trips_through_a_dict() -> None:
    p = process(cpu=0.5)
    data = p.to_dict()
    assert data["cpu_share"] == pytest.approx(0.5)
    assert ClientProcess.from_dict(data) == p
