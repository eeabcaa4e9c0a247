"""Plotly figures of running chatsse for real: a per-key limit's burst (chatsse/bursts.py), a
soak run's report (chatsse/soak.py) and a chaos run's (chatsse/chaos.py).

Every builder returns a ``plotly.graph_objects.Figure``; times are seconds, on the clock of
what they plot (the burst's start, the soak run's start, the fault).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from chatsse.bursts import Burst

__all__ = [
    "ending_colors",
    "probe_timeline",
    "soak_endings",
    "soak_workers",
    "stream_attempts",
    "stream_endings",
]

ADMITTED, REFUSED, LIMIT = "#2a9d8f", "#e63946", "#555"
FAILURE_COLORS = [REFUSED, "#f4a261", "#9b2226", "#e9c46a", "#6a4c93"]

# A fault's moments in its report (seconds after the fault), with what to call them.
FAULT_MOMENTS = {
    "replaced_after_s": "replacement spawned",
    "replacement_serving_after_s": "replacement serving",
    "stopped_after_s": "Redis stopped",
    "answering_after_s": "Redis answers",
    "fill_took_s": "disk full",
    "writes_failed_after_s": "writes fail",
}


def stream_attempts(burst: Burst, limit: int | None = None) -> go.Figure:
    """Above, the streams open at once as the clients saw them (and the limit); below, each
    client's attempts: a bar while an admitted stream was open, a cross for a refusal."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.35, 0.65], vertical_spacing=0.06)
    steps = burst.open_streams()
    figure.add_trace(
        go.Scatter(
            x=[t for t, _ in steps],
            y=[n for _, n in steps],
            mode="lines",
            line_shape="hv",
            name="streams open",
            line={"color": ADMITTED},
        ),
        row=1,
        col=1,
    )
    if limit is not None:
        figure.add_hline(
            y=limit, line={"dash": "dash", "color": LIMIT}, annotation_text=f"limit {limit}", row=1, col=1
        )
    xs: list[float | None] = []
    ys: list[int | None] = []
    for attempt in burst.admitted:
        xs += [attempt.opened if attempt.opened is not None else attempt.sent, attempt.ended, None]
        ys += [attempt.client, attempt.client, None]
    figure.add_trace(
        go.Scatter(x=xs, y=ys, mode="lines", name="admitted", line={"color": ADMITTED, "width": 6}),
        row=2,
        col=1,
    )
    refused = burst.refused
    figure.add_trace(
        go.Scatter(
            x=[a.sent for a in refused],
            y=[a.client for a in refused],
            mode="markers",
            name="429",
            marker={"symbol": "x-thin-open", "size": 7, "color": REFUSED},
        ),
        row=2,
        col=1,
    )
    figure.update_yaxes(title_text="open", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title_text="client", autorange="reversed", row=2, col=1)
    figure.update_xaxes(title_text="seconds since the burst began", row=2, col=1)
    figure.update_layout(
        title=f"{burst.clients} clients, one key: {len(burst.admitted)} streams admitted, "
        f"{len(refused)} refused",
        height=480,
    )
    return figure


def _mib(kib: float) -> float:
    return kib / 1024


_WORKER_FIGURES: tuple[tuple[str, str, Callable[[float], float]], ...] = (
    ("rss_kib", "RSS (MiB)", _mib),
    ("fds", "open descriptors", float),
    ("tasks", "asyncio tasks", float),
)


def soak_workers(report: dict[str, Any]) -> go.Figure:
    """Each worker's RSS, descriptors and asyncio tasks through a soak run: busy samples as
    lines, the figures at rest after the warm-up and at the end as diamonds, the traffic
    shaded."""
    workers = report["workers"]
    figure = make_subplots(
        rows=len(_WORKER_FIGURES),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.05,
        subplot_titles=[title for _, title, _ in _WORKER_FIGURES],
    )
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    pids = [w["pid"] for w in workers["start"]]
    for index, pid in enumerate(pids):
        color = colors[index % len(colors)]
        for row, (field, _, scale) in enumerate(_WORKER_FIGURES, start=1):
            busy = [
                (sample["at_s"], w[field])
                for sample in report["timeline"]
                for w in sample["workers"]
                if w["pid"] == pid and w[field] is not None
            ]
            at_rest = [
                (workers[f"{when}_at_s"], w[field])
                for when in ("start", "end")
                for w in workers[when]
                if w["pid"] == pid and w[field] is not None
            ]
            at_rest_marker = {
                "symbol": "diamond",
                "size": 11,
                "color": color,
                "line": {"width": 1, "color": "#222"},
            }
            for points, name, style in (
                (
                    busy,
                    f"worker {pid}",
                    {"mode": "lines+markers", "line": {"color": color}, "marker": {"size": 4}},
                ),
                (at_rest, f"worker {pid} at rest", {"mode": "markers", "marker": at_rest_marker}),
            ):
                figure.add_trace(
                    go.Scatter(
                        x=[t for t, _ in points],
                        y=[scale(v) for _, v in points],
                        name=name,
                        legendgroup=str(pid),
                        showlegend=row == 1,
                        **style,
                    ),
                    row=row,
                    col=1,
                )
    traffic = report["phases"]["traffic"]
    figure.add_vrect(
        x0=traffic["began_at_s"],
        x1=traffic["began_at_s"] + traffic["seconds"],
        fillcolor="#999",
        opacity=0.12,
        line_width=0,
        annotation_text="traffic",
        annotation_position="top left",
    )
    figure.update_xaxes(title_text="seconds since the run began", row=len(_WORKER_FIGURES), col=1)
    figure.update_layout(title=f"Workers through the soak ({report['store']})", height=620)
    return figure


REFUSAL_COLORS = ["#457b9d", "#1d3557", "#a8dadc", "#4895ef", "#3a0ca3", "#7209b7"]


def ending_colors(endings: Sequence[str]) -> dict[str, str]:
    """One color per ending, the same kind of ending in the same family of colors: a success
    green, a client's own drop grey, a 4xx refusal blue, any other failure warm."""
    colors: dict[str, str] = {}
    refusals, failures = iter(REFUSAL_COLORS * len(endings)), iter(FAILURE_COLORS * len(endings))
    for ending in endings:
        if ending in ("completed", "http_200"):
            colors[ending] = ADMITTED if ending == "completed" else "#8ac926"
        elif ending == "dropped":
            colors[ending] = "#adb5bd"
        elif ending.startswith("http_4"):
            colors[ending] = next(refusals)
        else:
            colors[ending] = next(failures)
    return colors


def _stacked_endings(rows: dict[str, dict[str, int]], title: str, axis: str) -> go.Figure:
    """Horizontal bars, one per row, stacked by ending."""
    endings = sorted({ending for counts in rows.values() for ending in counts})
    colors = ending_colors(endings)
    names = list(rows)
    figure = go.Figure()
    for ending in endings:
        figure.add_trace(
            go.Bar(
                name=ending,
                y=names,
                x=[rows[n].get(ending, 0) for n in names],
                orientation="h",
                marker_color=colors[ending],
            )
        )
    figure.update_layout(
        barmode="stack",
        title=title,
        xaxis_title=axis,
        yaxis={"autorange": "reversed"},
        height=max(300, 120 + 24 * len(names), 120 + 20 * len(endings)),
        legend={"title_text": "ending", "traceorder": "normal"},
    )
    return figure


def soak_endings(report: dict[str, Any]) -> go.Figure:
    """A soak run's requests by kind, each bar split by how they ended."""
    return _stacked_endings(
        {kind: report["endings"].get(kind, {}) for kind in report["requests"]},
        f"{sum(report['requests'].values())} requests by kind and ending "
        f"({sum(report['unexpected'].values())} unexpected)",
        "requests (warm-up included)",
    )


def _faults(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [fault for run in report["runs"] for fault in run["faults"]]


def stream_endings(report: dict[str, Any]) -> go.Figure:
    """For each fault of a chaos run, the streams open when it hit, split by how they ended."""
    return _stacked_endings(
        {f"{f['fault']} ({f['store']})": f["stream_endings"] for f in _faults(report)},
        "Streams open when the fault hit, by how they ended",
        "streams",
    )


def probe_timeline(fault: dict[str, Any], *, moments: Sequence[str] = tuple(FAULT_MOMENTS)) -> go.Figure:
    """A fault's probes (short ``/chat`` turns on fresh connections): when each was sent after
    the fault and how long it took, by ending; the fault, the repair, the recovery and the
    fault's own ``moments`` (keys of its report) as vertical lines."""
    recovery = fault["recovery"]
    by_ending: dict[str, list[tuple[float, float]]] = {}
    for sent, took, ending in recovery["timeline"]:
        by_ending.setdefault(ending, []).append((sent, took * 1000))
    figure = go.Figure()
    failures = iter(FAILURE_COLORS * len(by_ending))
    for ending, points in sorted(by_ending.items(), key=lambda item: item[0] != "completed"):
        ok = ending == "completed"
        figure.add_trace(
            go.Scatter(
                x=[s for s, _ in points],
                y=[t for _, t in points],
                mode="markers",
                name=ending,
                marker={"color": ADMITTED if ok else next(failures), "symbol": "circle" if ok else "x"},
            )
        )
    lines = {"fault": 0.0, **{FAULT_MOMENTS.get(k, k): fault.get(k) for k in moments}}
    repaired, recovered = recovery["repaired_after_s"], recovery["recovered_after_s"]
    if repaired:  # a kill is its own repair, at 0
        lines["repair began"] = repaired
    lines["recovered"] = recovered
    marked = sorted(((at, label) for label, at in lines.items() if at is not None), key=lambda m: m[0])
    for step, (at, label) in enumerate(marked):  # labels above the plot, stepped up left to right
        figure.add_vline(
            x=at, line={"dash": "solid" if label in ("fault", "recovered") else "dot", "color": LIMIT}
        )
        figure.add_annotation(
            x=at,
            y=1,
            yref="paper",
            yanchor="bottom",
            yshift=2 + 15 * step,
            text=label,
            showarrow=False,
            xanchor="left",
            font={"size": 11},
        )
    figure.update_layout(
        title=f"{fault['fault']} on {fault['store']}: {recovery['sent']} probes, "
        f"{recovery['failed']} failed; recovered after {recovered} s",
        xaxis_title="sent, seconds after the fault",
        yaxis_title="took (ms)",
        yaxis_type="log",
        height=380 + 15 * len(marked),
        margin={"t": 80 + 15 * len(marked)},
    )
    return figure
