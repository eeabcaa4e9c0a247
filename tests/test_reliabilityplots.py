"""The figures of a burst, a soak report and a chaos report (chatsse/reliabilityplots.py): each
draws what its data says. The reports are small ones in the shape chatsse/soak.py and
chatsse/chaos.py write (the notebook draws real ones)."""

from __future__ import annotations

from typing import Any

from chatsse import reliabilityplots
from chatsse.bursts import Attempt, Burst


def _worker(pid: int, rss_kib: int, fds: int, tasks: int | None) -> dict[str, Any]:
    return {"pid": pid, "rss_kib": rss_kib, "fds": fds, "threads": 2, "tasks": tasks}


SOAK: dict[str, Any] = {
    "store": "sqlite",
    "phases": {"warmup": {"began_at_s": 0.0, "seconds": 1.0}, "traffic": {"began_at_s": 4.5, "seconds": 2.0}},
    "workers": {
        "start": [_worker(10, 80 * 1024, 30, 3), _worker(11, 81 * 1024, 31, None)],
        "end": [_worker(10, 82 * 1024, 30, 3), _worker(11, 81 * 1024, 31, None)],
        "start_at_s": 4.4,
        "end_at_s": 10.0,
    },
    "timeline": [
        {"at_s": 5.0, "workers": [_worker(10, 81 * 1024, 40, 20), _worker(11, 81 * 1024, 41, None)]},
        {"at_s": 6.0, "workers": [_worker(10, 82 * 1024, 38, 18), _worker(11, 82 * 1024, 39, None)]},
    ],
    "requests": {"chat": 10, "bad_json": 2},
    "endings": {"chat": {"completed": 9, "dropped": 1}, "bad_json": {"http_422:invalid_request": 2}},
    "unexpected": {},
}


def _trace(figure: Any, name: str, axis: str | None = None) -> Any:
    """The trace called ``name`` on the y axis ``axis`` (None: a figure of one plot, or its first)."""
    (found,) = [t for t in figure.data if t.name == name and t.yaxis in ((axis,) if axis else (None, "y"))]
    return found


def test_a_bursts_figure_shows_open_streams_each_admitted_stream_and_each_refusal() -> None:
    attempts = [
        Attempt(0, 0.0, 1.0, 200, opened=0.1),
        Attempt(1, 0.0, 0.05, 429, headers={"retry-after": "1"}),
        Attempt(1, 0.3, 0.35, 429),
        Attempt(0, 1.0, 1.8, 200, opened=1.1),
    ]
    figure = reliabilityplots.stream_attempts(Burst(attempts, clients=2, duration=1.0), limit=1)
    opened = _trace(figure, "streams open")
    assert list(opened.y) == [0, 1, 0, 1, 0]
    admitted = _trace(figure, "admitted", "y2")
    assert list(admitted.x) == [0.1, 1.0, None, 1.1, 1.8, None]  # a bar while each was open
    assert list(admitted.y) == [0, 0, None, 0, 0, None]
    refused = _trace(figure, "429", "y2")
    assert list(refused.x) == [0.0, 0.3]  # when each refused request was sent
    assert [shape.y0 for shape in figure.layout.shapes] == [1]  # the limit
    assert "2 streams admitted, 2 refused" in figure.layout.title.text


def test_the_soak_figure_puts_each_worker_at_rest_and_busy_on_the_runs_clock() -> None:
    figure = reliabilityplots.soak_workers(SOAK)
    at_rest = _trace(figure, "worker 10 at rest")
    assert list(at_rest.x) == [4.4, 10.0]
    assert list(at_rest.y) == [80.0, 82.0]  # MiB
    busy_fds = _trace(figure, "worker 10", "y2")
    assert list(busy_fds.x) == [5.0, 6.0]
    assert list(busy_fds.y) == [40, 38]
    assert list(_trace(figure, "worker 10 at rest", "y3").y) == [3, 3]
    assert list(_trace(figure, "worker 11", "y3").y) == []  # its tasks were not measured: not drawn as 0
    assert {(shape.x0, shape.x1) for shape in figure.layout.shapes} == {(4.5, 6.5)}  # the traffic, shaded


def test_the_endings_figure_stacks_each_kinds_requests_by_ending() -> None:
    figure = reliabilityplots.soak_endings(SOAK)
    bars = {trace.name: dict(zip(trace.y, trace.x, strict=True)) for trace in figure.data}
    assert bars == {
        "completed": {"chat": 9, "bad_json": 0},
        "dropped": {"chat": 1, "bad_json": 0},
        "http_422:invalid_request": {"chat": 0, "bad_json": 2},
    }
    assert "12 requests" in figure.layout.title.text


def test_endings_are_colored_by_family() -> None:
    colors = reliabilityplots.ending_colors(
        ["completed", "dropped", "http_404:a", "http_413:b", "closed", "error:storage_error"]
    )
    assert colors["completed"] == reliabilityplots.ADMITTED
    assert colors["http_404:a"] in reliabilityplots.REFUSAL_COLORS
    assert colors["http_413:b"] in reliabilityplots.REFUSAL_COLORS
    assert colors["http_404:a"] != colors["http_413:b"]
    assert colors["closed"] in reliabilityplots.FAILURE_COLORS
    assert colors["error:storage_error"] in reliabilityplots.FAILURE_COLORS
    assert len(set(colors.values())) == len(colors)


def _fault(name: str, timeline: list[list[Any]], repaired: float, **moments: float) -> dict[str, Any]:
    return {
        "fault": name,
        "store": "redis",
        "recovery": {
            "sent": len(timeline),
            "failed": sum(1 for *_, ending in timeline if ending != "completed"),
            "repaired_after_s": repaired,
            "recovered_after_s": 2.3,
            "timeline": timeline,
        },
        "stream_endings": {"completed": 3, "error:storage_error": 2},
        **moments,
    }


def test_a_probe_timeline_marks_the_fault_its_repair_its_recovery_and_its_own_moments() -> None:
    timeline = [[0.0, 0.01, "http_503:storage_unavailable"], [1.0, 0.02, "http_503:storage_unavailable"],
                [2.2, 0.1, "completed"], [2.4, 0.02, "completed"]]  # fmt: skip
    figure = reliabilityplots.probe_timeline(
        _fault("redis_restart", timeline, 2.0, stopped_after_s=0.1, answering_after_s=2.2)
    )
    failed = _trace(figure, "http_503:storage_unavailable")
    assert (list(failed.x), list(failed.y)) == ([0.0, 1.0], [10.0, 20.0])  # sent, took (ms)
    assert list(_trace(figure, "completed").x) == [2.2, 2.4]
    marks = {a.text: a.x for a in figure.layout.annotations}
    assert marks == {
        "fault": 0.0,
        "Redis stopped": 0.1,
        "repair began": 2.0,
        "Redis answers": 2.2,
        "recovered": 2.3,
    }
    assert sorted(shape.x0 for shape in figure.layout.shapes) == sorted(marks.values())


def test_a_kill_is_its_own_repair() -> None:
    figure = reliabilityplots.probe_timeline(
        _fault("kill_worker", [[0.0, 0.02, "completed"]], 0.0, replaced_after_s=0.3)
    )
    assert {a.text for a in figure.layout.annotations} == {"fault", "replacement spawned", "recovered"}


def test_the_chaos_endings_figure_has_a_bar_per_fault() -> None:
    report = {
        "runs": [
            {"faults": [_fault("kill_worker", [], 0.0)]},
            {"faults": [_fault("redis_restart", [], 2.0)]},
        ]
    }
    figure = reliabilityplots.stream_endings(report)
    completed = _trace(figure, "completed")
    assert list(completed.y) == ["kill_worker (redis)", "redis_restart (redis)"]
    assert list(completed.x) == [3, 3]
