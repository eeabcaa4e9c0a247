"""Plotly figures of load-test results and of the workbook's experiments, and one
self-contained HTML page to hold them.

Every builder returns a ``plotly.graph_objects.Figure``; times on the x axis are seconds
since the run's (or the experiment's) start, latencies are milliseconds.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import plotly.graph_objects as go  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from chatsse import protocol
from chatsse.loadgen import LoadTestResult
from chatsse.loadmetrics import SLO, RequestRecord, Stats, timeline

if TYPE_CHECKING:  # the workbook's client needs httpx-sse, which the load extra does not install
    from chatsse.workbook import ChatTurn

__all__ = [
    "coordinated_omission",
    "goodput_vs_rate",
    "latency_cdf",
    "percentile_spectrum",
    "request_timeline",
    "save_html",
    "shutdown_timeline",
    "sweep_knee",
    "throughput_over_time",
    "turns_per_worker",
    "worker_spread",
]

_LATENCIES: dict[str, tuple[str, Callable[[RequestRecord], list[float]]]] = {
    "ttft": ("TTFT", lambda r: [] if r.ttft is None else [r.ttft]),
    "tpot": ("TPOT", lambda r: [] if r.tpot is None else [r.tpot]),
    "itl": ("ITL", lambda r: r.itls),
    "e2e": ("E2E", lambda r: [] if r.e2e is None else [r.e2e]),
    "e2e_intended": ("E2E (intended start)", lambda r: [] if r.e2e_intended is None else [r.e2e_intended]),
}
# The percentile spectrum's x axis: -log10(1 - p), so 90, 99, 99.9 are evenly spaced.
_NINES = (0.0, 50.0, 90.0, 99.0, 99.9, 99.99)


def _latencies_ms(result: LoadTestResult, metric: str) -> list[float]:
    if metric not in _LATENCIES:
        raise ValueError(f"unknown latency {metric!r}; expected one of {sorted(_LATENCIES)}")
    pick = _LATENCIES[metric][1]
    return sorted(1000.0 * v for r in result.records if r.ok for v in pick(r))


def _cdf(result: LoadTestResult, metric: str) -> go.Scatter:
    values = _latencies_ms(result, metric)
    n = len(values)
    return go.Scatter(
        x=values, y=[(i + 1) / n for i in range(n)], mode="lines", line_shape="hv", name=_LATENCIES[metric][0]
    )


def latency_cdf(result: LoadTestResult, metrics: Sequence[str] = ("ttft", "itl", "e2e")) -> go.Figure:
    """Cumulative distribution of each latency (completed requests), one trace each."""
    figure = go.Figure()
    for metric in metrics:
        figure.add_trace(_cdf(result, metric))
    figure.update_layout(
        title=f"Latency CDF ({result.config.label})",
        xaxis_title="latency (ms)",
        yaxis_title="fraction of samples ≤ x",
        xaxis_type="log",
    )
    return figure


def coordinated_omission(result: LoadTestResult) -> go.Figure:
    """The end-to-end latency of the same requests measured two ways, as CDFs: from when each
    was sent (all a closed loop can record) and from when the schedule meant it to start (what
    a user arriving then waited). The horizontal gap between the curves is time spent waiting
    to be sent, which a closed loop omits."""
    figure = go.Figure()
    for metric, name in (("e2e", "from send"), ("e2e_intended", "from intended start")):
        figure.add_trace(_cdf(result, metric).update(name=f"E2E {name}"))
    figure.update_layout(
        title=f"Coordinated omission: one run's E2E, two clocks ({result.config.label})",
        xaxis_title="end-to-end latency (ms)",
        yaxis_title="fraction of requests ≤ x",
        xaxis_rangemode="tozero",
    )
    return figure


def percentile_spectrum(result: LoadTestResult, metrics: Sequence[str] = ("ttft", "itl", "e2e")) -> go.Figure:
    """Latency against percentile on a "nines" axis, where the tail is visible."""
    figure = go.Figure()
    for metric in metrics:
        values = _latencies_ms(result, metric)
        n = len(values)
        # Plotting position i / n for the i-th smallest value (1-based), capped below 1.
        fractions = [min(i / n, 1 - 0.5 / n) for i in range(1, n + 1)]
        figure.add_trace(
            go.Scatter(
                x=[-math.log10(1 - f) for f in fractions],
                y=values,
                mode="lines",
                name=_LATENCIES[metric][0],
                customdata=[100 * f for f in fractions],
                hovertemplate="p%{customdata:.3f}: %{y:.2f} ms",
            )
        )
    figure.update_layout(
        title=f"Latency by percentile ({result.config.label})",
        xaxis={
            "title": "percentile",
            "tickvals": [-math.log10(1 - p / 100) for p in _NINES],
            "ticktext": [f"p{p:g}" for p in _NINES],
        },
        yaxis_title="latency (ms)",
        yaxis_type="log",
    )
    return figure


def request_timeline(result: LoadTestResult, *, max_requests: int = 1000) -> go.Figure:
    """One row per request (the first ``max_requests`` sent): waiting for the first token,
    then streaming; failed requests in their own colour; a marker at each intended start,
    joined to the send by a line when the request was late.
    """
    t0 = result.start
    records = sorted(result.records, key=lambda r: r.sent)[:max_requests]
    waiting: tuple[list[float], list[float], list[int]] = ([], [], [])
    streaming: tuple[list[float], list[float], list[int]] = ([], [], [])
    failed: tuple[list[float], list[float], list[int]] = ([], [], [])
    failed_text: list[str] = []
    late_x: list[float | None] = []
    late_y: list[int | None] = []
    for row, r in enumerate(records):
        end = (r.end if r.end is not None else r.sent) - t0
        sent = r.sent - t0
        if not r.ok:
            failed[0].append(sent)
            failed[1].append(end - sent)
            failed[2].append(row)
            failed_text.append(r.error or f"http_{r.status}")
        else:
            first = (r.first_token_at if r.first_token_at is not None else r.end or r.sent) - t0
            waiting[0].append(sent)
            waiting[1].append(first - sent)
            waiting[2].append(row)
            streaming[0].append(first)
            streaming[1].append(end - first)
            streaming[2].append(row)
        if r.lateness > 0:
            late_x += [r.intended_start - t0, sent, None]
            late_y += [row, row, None]

    def bars(name: str, spans: tuple[list[float], list[float], list[int]], color: str) -> go.Bar:
        base, length, rows = spans
        return go.Bar(name=name, base=base, x=length, y=rows, orientation="h", marker_color=color, width=0.8)

    figure = go.Figure()
    figure.add_trace(bars("waiting for first token", waiting, "#f2b134"))
    figure.add_trace(bars("streaming", streaming, "#2f7ed8"))
    failed_bars = bars("failed", failed, "#d62728")
    failed_bars.update(text=failed_text, hovertemplate="%{text}<extra>failed</extra>")
    figure.add_trace(failed_bars)
    figure.add_trace(
        go.Scatter(
            name="intended start",
            x=[r.intended_start - t0 for r in records],
            y=list(range(len(records))),
            mode="markers",
            marker={"symbol": "line-ns-open", "size": 8, "color": "#444"},
        )
    )
    figure.add_trace(
        go.Scatter(name="lateness", x=late_x, y=late_y, mode="lines", line={"color": "#444", "dash": "dot"})
    )
    figure.update_layout(
        title=f"Requests over time ({result.config.label})",
        barmode="overlay",
        xaxis_title="time since start (s)",
        yaxis_title="request (in send order)",
        yaxis_autorange="reversed",
        bargap=0.1,
    )
    return figure


def throughput_over_time(result: LoadTestResult, *, bucket: float = 1.0) -> go.Figure:
    """Tokens per second and open streams, per ``bucket`` seconds (``loadmetrics.timeline``)."""
    rows = timeline(result.records, bucket=bucket)
    # timeline counts from the first send; shift to the run's start like the other plots.
    offset = min((r.sent for r in result.records), default=result.start) - result.start
    starts = [offset + start for start, _, _ in rows]
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(
        go.Scatter(x=starts, y=[rate for _, rate, _ in rows], name="tokens/s", line_shape="hv"),
        secondary_y=False,
    )
    figure.add_trace(
        go.Scatter(x=starts, y=[n for _, _, n in rows], name="open streams", line_shape="hv"),
        secondary_y=True,
    )
    figure.update_layout(title=f"Throughput and open streams ({result.config.label})")
    figure.update_xaxes(title_text="time since start (s)")
    figure.update_yaxes(title_text="tokens/s", secondary_y=False, rangemode="tozero")
    figure.update_yaxes(title_text="open streams", secondary_y=True, rangemode="tozero")
    return figure


def _stat_ms(stats: Stats | None, percentile: int) -> float | None:
    return None if stats is None else 1000.0 * float(getattr(stats, f"p{percentile}"))


def sweep_knee(
    results: Sequence[LoadTestResult],
    *,
    metrics: Sequence[str] = ("ttft", "e2e"),
    percentile: int = 95,
    throughput: str = "tokens",
) -> go.Figure:
    """Throughput against a latency percentile, one labelled point per sweep run.

    The knee is where more load stops buying throughput and only adds latency.
    ``throughput`` is ``"tokens"`` (output tokens/s) or ``"requests"`` (requests/s).
    """
    if percentile not in (50, 90, 95, 99):
        raise ValueError(f"percentile must be one of 50, 90, 95, 99, got {percentile}")
    summaries = [r.summary() for r in results]
    if throughput == "tokens":
        xs = [s.output_token_throughput for s in summaries]
        x_title = "output throughput (tokens/s)"
    elif throughput == "requests":
        xs = [s.request_throughput for s in summaries]
        x_title = "request throughput (requests/s)"
    else:
        raise ValueError(f"throughput must be 'tokens' or 'requests', got {throughput!r}")
    labels = [r.config.label for r in results]
    figure = go.Figure()
    for metric in metrics:
        if metric not in ("ttft", "tpot", "itl", "e2e"):
            raise ValueError(f"unknown latency {metric!r}; expected ttft, tpot, itl or e2e")
        figure.add_trace(
            go.Scatter(
                x=xs,
                y=[_stat_ms(getattr(s, metric), percentile) for s in summaries],
                mode="lines+markers+text",
                text=labels,
                textposition="top left",
                name=f"p{percentile} {_LATENCIES[metric][0]}",
            )
        )
    figure.update_layout(
        title=f"Throughput vs p{percentile} latency", xaxis_title=x_title, yaxis_title="latency (ms)"
    )
    return figure


def goodput_vs_rate(results: Sequence[LoadTestResult], *, slo: SLO | None = None) -> go.Figure:
    """Completed and good requests per second against the offered rate, with the ideal line.

    The offered rate is, for open-loop runs, the configured user arrival rate times the
    turns per user (the steady-state request rate), else the requests sent per second.
    ``slo`` defaults to each run's own.
    """
    offered = [
        r.config.rate * r.config.turns
        if r.config.rate is not None
        else len(r.records) / max(r.duration, 1e-9)
        for r in results
    ]
    summaries = [r.summary(slo) for r in results]
    labels = [r.config.label for r in results]
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=offered,
            y=[s.request_throughput for s in summaries],
            mode="lines+markers",
            name="completed requests/s",
            text=labels,
        )
    )
    figure.add_trace(
        go.Scatter(
            x=offered,
            y=[s.goodput for s in summaries],
            mode="lines+markers",
            name="goodput (requests/s within SLO)",
            text=labels,
        )
    )
    top = max(offered, default=0.0)
    figure.add_trace(
        go.Scatter(
            x=[0, top], y=[0, top], mode="lines", name="offered", line={"dash": "dot", "color": "#888"}
        )
    )
    figure.update_layout(
        title="Goodput vs offered rate", xaxis_title="offered rate (requests/s)", yaxis_title="requests/s"
    )
    return figure


def _worker_labels(answered: Mapping[str, Sequence[int]], workers: Sequence[int]) -> list[int]:
    """Every worker in ``workers`` order, then any other pid that answered, in pid order."""
    seen = {pid for pids in answered.values() for pid in pids}
    return [*workers, *sorted(seen - set(workers))]


def worker_spread(answered: Mapping[str, Sequence[int]], workers: Sequence[int] = ()) -> go.Figure:
    """Which worker process answered each turn: one row per worker pid, one marker per turn,
    one trace per series of turns (``{"one conversation": [pid, ...], "a burst": [...]}``).
    ``workers`` (every worker's pid) gives a row to a worker that answered nothing."""
    rows = [f"pid {pid}" for pid in _worker_labels(answered, workers)]
    figure = go.Figure()
    for name, pids in answered.items():
        figure.add_trace(
            go.Scatter(
                x=list(range(1, len(pids) + 1)),
                y=[f"pid {pid}" for pid in pids],
                mode="markers+lines",
                name=name,
                line={"width": 0.5, "dash": "dot"},
                marker={"size": 10},
            )
        )
    figure.update_layout(
        title="Which worker answered each turn",
        xaxis_title="turn (in the order sent)",
        yaxis={"title": "worker", "categoryorder": "array", "categoryarray": rows, "type": "category"},
    )
    return figure


def turns_per_worker(answered: Mapping[str, Sequence[int]], workers: Sequence[int] = ()) -> go.Figure:
    """How many turns each worker process answered, stacked by series (as :func:`worker_spread`)."""
    order = _worker_labels(answered, workers)
    labels = [f"pid {pid}" for pid in order]
    figure = go.Figure()
    for name, pids in answered.items():
        figure.add_trace(go.Bar(x=labels, y=[list(pids).count(pid) for pid in order], name=name))
    figure.update_layout(
        title="Turns per worker", barmode="stack", xaxis_title="worker", yaxis_title="turns answered"
    )
    return figure


def shutdown_timeline(
    turns: Sequence[ChatTurn], sigterm_at: float, *, grace: float | None = None
) -> go.Figure:
    """Streams open during a graceful shutdown: each one's tokens received over time, a line at
    the SIGTERM, the grace period shaded, and each stream's end marked by how it ended: one
    trace per last event (``completed``, or an error's type, such as ``shutdown``).

    ``sigterm_at`` is a ``time.perf_counter()`` reading, the clock of ``ChatTurn.sent_at``; the
    x axis counts seconds from the first stream's send.
    """
    if not turns:
        raise ValueError("no streams to draw")
    origin = min(turn.sent_at for turn in turns)
    figure = go.Figure()
    ends: dict[str, tuple[list[float], list[int]]] = {}
    for number, turn in enumerate(turns, 1):
        times = [turn.sent_at - origin + t for t in turn.token_times]
        figure.add_trace(
            go.Scatter(
                x=times,
                y=list(range(1, len(times) + 1)),
                mode="lines",
                line_shape="hv",
                name=f"stream {number}",
            )
        )
        if turn.events:
            at, name, data = turn.events[-1]
            how = str(data.get("type", name)) if name == protocol.ERROR else name
            xs, ys = ends.setdefault(how, ([], []))
            xs.append(turn.sent_at - origin + at)
            ys.append(len(times))
    for how, (xs, ys) in ends.items():
        figure.add_trace(
            go.Scatter(x=xs, y=ys, mode="markers", marker={"symbol": "x", "size": 10}, name=f"ended: {how}")
        )
    sigterm = sigterm_at - origin
    if grace is not None:
        figure.add_vrect(x0=sigterm, x1=sigterm + grace, fillcolor="#f2b134", opacity=0.2, line_width=0)
    figure.add_vline(x=sigterm, line={"color": "#444", "dash": "dash"}, annotation_text="SIGTERM")
    figure.update_layout(
        title="Streams through a graceful shutdown",
        xaxis_title="seconds since the first stream was sent",
        yaxis_title="tokens received",
    )
    return figure


def save_html(figures: Sequence[go.Figure], path: str | Path, *, title: str = "chatsse load test") -> None:
    """Write the figures into one HTML file that works offline (plotly.js inlined once)."""
    divs = [
        figure.to_html(full_html=False, include_plotlyjs=(i == 0), default_height="520px")
        for i, figure in enumerate(figures)
    ]
    body = "\n".join(f'<section class="figure">{div}</section>' for div in divs)
    Path(path).write_text(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f"{body}\n</body>\n</html>\n",
        encoding="utf-8",
    )
