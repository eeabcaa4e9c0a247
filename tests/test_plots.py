"""Figure builders return the traces they promise, from hand-built results."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatsse import plots
from chatsse.loadgen import LoadConfig, LoadTestResult
from chatsse.loadmetrics import SLO, RequestRecord
from chatsse.workbook import ChatTurn


def record(
    request_id: int, intended: float, sent: float, tokens_at: list[float], error: str | None = None
) -> RequestRecord:
    end = (tokens_at[-1] if tokens_at else sent) + 0.01
    return RequestRecord(
        request_id=request_id,
        user_id=0,
        turn=0,
        intended_start=intended,
        sent=sent,
        headers_at=sent + 0.005,
        first_token_at=tokens_at[0] if tokens_at else None,
        token_times=tokens_at,
        end=end,
        events=len(tokens_at) + 2,
        tokens=len(tokens_at),
        bytes_received=50 * len(tokens_at),
        status=200,
        error=error,
        prompt_tokens=10,
    )


def result(rate: float, start: float = 100.0) -> LoadTestResult:
    records = [
        record(0, start, start, [start + 0.1, start + 0.15, start + 0.2]),
        record(1, start + 0.5, start + 0.7, [start + 0.8, start + 0.82, start + 0.9, start + 1.0]),  # late
        record(2, start + 1.0, start + 1.0, [start + 1.1], error="stream_error:engine_error"),
        record(3, start + 1.5, start + 1.5, [start + 1.7, start + 1.8]),  # TTFT above the SLO
    ]
    config = LoadConfig(requests=4, rate=rate, slo=SLO(ttft=0.12))
    return LoadTestResult(
        config, {"protocol": "chatsse", "url": "http://x/chat"}, records, start, start + 2.0, 0.0
    )


def names(figure: object) -> list[str]:
    return [trace.name for trace in figure.data]  # type: ignore[attr-defined]


def test_latency_cdf_has_one_trace_per_latency() -> None:
    figure = plots.latency_cdf(result(2.0))
    assert names(figure) == ["TTFT", "ITL", "E2E"]
    ttft = figure.data[0]
    assert list(ttft.x) == pytest.approx([100.0, 100.0, 200.0])  # ms; the failed request is left out
    assert list(ttft.y) == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_percentile_spectrum_uses_a_nines_axis() -> None:
    figure = plots.percentile_spectrum(result(2.0), metrics=("ttft", "tpot"))
    assert names(figure) == ["TTFT", "TPOT"]
    assert list(figure.layout.xaxis.ticktext) == ["p0", "p50", "p90", "p99", "p99.9", "p99.99"]
    with pytest.raises(ValueError, match="unknown latency"):
        plots.percentile_spectrum(result(2.0), metrics=("nope",))


def test_request_timeline_shows_waiting_streaming_failed_and_lateness() -> None:
    figure = plots.request_timeline(result(2.0))
    assert names(figure) == ["waiting for first token", "streaming", "failed", "intended start", "lateness"]
    waiting, _, failed, intended, late = figure.data
    assert list(waiting.y) == [0, 1, 3]
    assert list(failed.y) == [2]
    assert list(waiting.base) == pytest.approx([0.0, 0.7, 1.5])
    assert list(waiting.x) == pytest.approx([0.1, 0.1, 0.2])
    assert list(intended.x) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert list(late.x)[:2] == pytest.approx([0.5, 0.7])  # request 1 waited 0.2 s


def test_throughput_over_time_has_tokens_and_open_streams() -> None:
    figure = plots.throughput_over_time(result(2.0), bucket=0.5)
    assert names(figure) == ["tokens/s", "open streams"]
    assert len(figure.data[0].x) == 4
    # At 0, 0.5, 1.0 and 1.5 s: request 0 open; none; requests 1 and 2; request 3.
    assert list(figure.data[1].y) == [1, 0, 2, 1]


def test_sweep_plots_have_one_point_per_run() -> None:
    runs = [result(1.0), result(2.0), result(4.0)]
    knee = plots.sweep_knee(runs)
    assert names(knee) == ["p95 TTFT", "p95 E2E"]
    assert list(knee.data[0].text) == ["rate 1/s", "rate 2/s", "rate 4/s"]
    goodput = plots.goodput_vs_rate(runs)
    assert names(goodput) == ["completed requests/s", "goodput (requests/s within SLO)", "offered"]
    assert list(goodput.data[0].x) == [1.0, 2.0, 4.0]
    # Three completed requests in 2 s; two of them have a TTFT within 120 ms of their send, and
    # one of those was sent 0.2 s late: from its intended start it missed the SLO.
    assert list(goodput.data[0].y) == pytest.approx([1.5] * 3)
    assert list(goodput.data[1].y) == pytest.approx([0.5] * 3)
    with pytest.raises(ValueError, match="percentile"):
        plots.sweep_knee(runs, percentile=42)


def test_save_html_inlines_plotly_once(tmp_path: Path) -> None:
    run = result(2.0)
    path = tmp_path / "report.html"
    plots.save_html(
        [plots.latency_cdf(run), plots.request_timeline(run), plots.throughput_over_time(run)], path
    )
    page = path.read_text()
    assert page.count("Plotly.newPlot(") == 3
    assert page.count("* plotly.js v") == 1
    assert 'src="https://cdn' not in page


def test_coordinated_omission_draws_the_same_requests_on_two_clocks() -> None:
    figure = plots.coordinated_omission(result(2.0))
    assert names(figure) == ["E2E from send", "E2E from intended start"]
    from_send, from_intended = figure.data
    # Completed requests 0, 1 and 3; request 1 was sent 0.2 s after its intended start.
    assert list(from_send.x) == pytest.approx([210.0, 310.0, 310.0])
    assert list(from_intended.x) == pytest.approx([210.0, 310.0, 510.0])
    assert list(from_intended.y) == pytest.approx([1 / 3, 2 / 3, 1.0])


ANSWERED = {"one conversation": [11, 12, 11], "a burst": [12, 12, 13]}


def test_worker_spread_has_a_row_for_every_worker_even_an_idle_one() -> None:
    figure = plots.worker_spread(ANSWERED, workers=[11, 12, 14])
    assert names(figure) == ["one conversation", "a burst"]
    # Workers in the given order, then a pid that answered without being listed.
    assert list(figure.layout.yaxis.categoryarray) == ["pid 11", "pid 12", "pid 14", "pid 13"]
    assert list(figure.data[0].x) == [1, 2, 3]
    assert list(figure.data[0].y) == ["pid 11", "pid 12", "pid 11"]


def test_turns_per_worker_counts_each_series_per_worker() -> None:
    figure = plots.turns_per_worker(ANSWERED, workers=[11, 12, 14])
    assert names(figure) == ["one conversation", "a burst"]
    assert list(figure.data[0].x) == ["pid 11", "pid 12", "pid 14", "pid 13"]
    assert list(figure.data[0].y) == [2, 1, 0, 0]
    assert list(figure.data[1].y) == [0, 2, 0, 1]


def test_shutdown_timeline_puts_streams_sigterm_and_grace_on_one_clock() -> None:
    token = {"delta": "x"}
    cut = ChatTurn(
        status=200,
        sent_at=10.0,
        events=[
            (0.01, "connected", {}),
            *((t, "message", token) for t in (0.1, 0.2, 0.3)),
            (0.35, "error", {"type": "shutdown", "message": "the server is shutting down"}),
        ],
    )
    done = ChatTurn(status=200, sent_at=10.05, events=[(0.1, "message", token), (0.2, "completed", {})])
    figure = plots.shutdown_timeline([cut, done], sigterm_at=10.15, grace=0.1)
    assert names(figure) == ["stream 1", "stream 2", "ended: shutdown", "ended: completed"]
    assert list(figure.data[0].x) == pytest.approx([0.1, 0.2, 0.3])
    assert list(figure.data[0].y) == [1, 2, 3]
    assert list(figure.data[1].x) == pytest.approx([0.15])  # sent 50 ms after the first
    shutdown, completed = figure.data[2:]
    assert (list(shutdown.x), list(shutdown.y)) == (pytest.approx([0.35]), [3])
    assert (list(completed.x), list(completed.y)) == (pytest.approx([0.25]), [1])
    grace, sigterm = figure.layout.shapes
    assert (grace.x0, grace.x1) == pytest.approx((0.15, 0.25))
    assert sigterm.x0 == sigterm.x1 == pytest.approx(0.15)
    with pytest.raises(ValueError, match="no streams"):
        plots.shutdown_timeline([], sigterm_at=0.0)
