"""Every notebook's "Try it yourself" exercises run as written, in the notebook's own kernel.

Each notebook is executed (quick mode) up to its "Clean up" cell, where every cell with an
output must be followed by a markdown cell that explains it; its first cell that starts a
named server is run again, which must replace that server rather than add one; then the code
of each exercise (the fenced ``python`` blocks of its markdown cell) runs in the same kernel,
followed by the check below where the exercise states an outcome; last, the clean-up cell must
leave nothing running. The notebooks run at the same time, one kernel each, so that their
waits (simulated tokens, servers starting) overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXERCISES = "## Try it yourself"
CLEAN_UP = "## Clean up"
CELL_TIMEOUT = 300
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

# What an exercise says will happen, checked after its code ran: (notebook number, exercise).
CHECKS: dict[tuple[str, int], str] = {
    ("01", 1): "assert fast_events == 32  # connected, 30 tokens, completed",
    ("01", 2): r'assert "retry: 5000" in retry_body.split("\n\n")[0]',
    ("01", 3): r"""
assert event.count(b"\n") == 4  # id, event and data lines, then the blank line
assert stored["messages"][0]["content"] == "line one\nline two"
""",
    ("01", 4): """
assert last_event.splitlines()[0].endswith(":13")
assert "event: completed" in last_event
""",
    ("02", 1): """
assert [p for p, _ in flat] == sorted(p for p, _ in flat)  # the prompt still grows
spread = lambda points: max(t for _, t in points) - min(t for _, t in points)
assert spread(flat) < spread(full)
""",
    ("02", 2): """
assert [a.text == b.text for a, b in zip(whole, cut)][:2] == [True, True]
assert whole[-1].text != cut[-1].text
assert cut[-1].usage["prompt_tokens"] < whole[-1].usage["prompt_tokens"]
""",
    ("02", 3): """
assert alice.conversation_id != bob.conversation_id
assert alice_said == [f"Alice, message {i}" for i in range(3)]
assert bob_said == [f"Bob, message {i}" for i in range(3)]
""",
    ("02", 4): """
assert sorted(turn.status for turn in both) == [200, 409]
assert [turn.error["type"] for turn in both if turn.error] == ["conversation_busy"]
""",
    ("03", 1): "assert again.status == 200",
    ("03", 2): 'assert [turn.events[-1][1] for turn in finished] == ["completed"] * 3',
    ("03", 3): """
assert any(isinstance(o, Exception) for o in outcomes)  # the victim's clients
assert victim not in fragile.worker_pids()
""",
    ("03", 4): "assert 'max_requests' in readme",
    ("04", 1): "assert g.lateness.max < s.lateness.max  # rate 3 against rate 10",
    ("04", 3): "assert c.request_throughput > summary.request_throughput  # 16 users against 4",
    ("04", 4): "assert o.completed == compatible.config.requests\nassert o.failed == 0",
    ("05", 1): "assert all(r.summary(tight).goodput <= r.summary(slo).goodput for r in rate_sweep)",
    ("05", 3): 'assert "http_503" in capped_sweep[-1].summary().errors_by_type  # refused past the knee',
    ("05", 4): """
fastest = lambda sweep: max(r.summary().request_throughput for r in sweep)
assert fastest(longer_sweep) < fastest(rate_sweep)
""",
}

# Every exercise of every notebook, found by reading the notebooks (collection stays quick).
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))


@dataclass
class Exercises:
    """One notebook's sections, as cell indexes and code."""

    cells: list[nbformat.NotebookNode]
    clean_up: int
    blocks: list[str]


def sections(path: Path) -> Exercises:
    notebook = nbformat.read(path, as_version=4)
    headings = [
        (i, cell.source.splitlines()[0])
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "markdown"
    ]
    starts = [i for i, first in headings if first.lower().startswith(EXERCISES.lower())]
    ends = [i for i, first in headings if first.lower().startswith(CLEAN_UP.lower())]
    assert len(starts) == 1, f"{path.name}: one {EXERCISES!r} section expected"
    assert len(ends) == 1, f"{path.name}: one {CLEAN_UP!r} section expected"
    start, end = starts[0], ends[0]
    assert start < end, f"{path.name}: the exercises come before the clean-up"
    assert any(c.cell_type == "code" for c in notebook.cells[end:]), f"{path.name}: a clean-up cell"
    assert not any(c.cell_type == "code" for c in notebook.cells[start:end]), (
        f"{path.name}: an exercise's code belongs in its markdown, for the learner to copy"
    )
    blocks = []
    for cell in notebook.cells[start + 1 : end]:
        code = "".join(_BLOCK.findall(cell.source))
        assert code, f"{path.name}: an exercise without code: {cell.source[:80]!r}"
        blocks.append(code)
    return Exercises(notebook.cells, end, blocks)


def number(path: Path) -> str:
    return path.name[:2]


def structure(path: Path) -> Exercises | str:
    """The notebook's sections, or what is wrong with them (reported by its tests, not at
    collection, so one malformed notebook does not hide the others' results)."""
    try:
        return sections(path)
    except AssertionError as error:
        return str(error)


@dataclass
class Run:
    """What happened in one notebook's kernel: an error message per step, None if it passed."""

    main: str | None = "not run"
    rerun: str | None = "not run"
    exercises: dict[int, str | None] = field(default_factory=dict)
    clean_up: str | None = "not run"
    unexplained: list[str] = field(default_factory=list)  # results with no markdown after them
    seconds: dict[str, float] = field(default_factory=dict)  # main, exercises: for a slow run's report


def _code(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source)


Step = Callable[[str], Awaitable[str | None]]


async def _exercise(run: Run, found: Exercises, step: Step, notebook: str) -> None:
    """Run a start cell again, then every exercise and its check, recording each error."""
    starts = [c for c in found.cells[: found.clean_up] if c.cell_type == "code" and 'name="' in c.source]
    if starts:
        run.rerun = await step(
            "from chatsse import registry as _registry\n_before = len(_registry.running())\n"
            + starts[0].source
            + "\nassert len(_registry.running()) == _before, 'a rerun added a server'"
        )
    else:
        run.rerun = "no cell starts a named server"
    for n, block in enumerate(found.blocks, 1):
        error = await step(block)
        check = CHECKS.get((notebook, n))
        if error is None and check is not None:
            error = await step(check)
        run.exercises[n] = error


async def _execute(path: Path) -> Run:
    found = structure(path)
    if isinstance(found, str):
        return Run(main=found)
    run = Run()
    notebook = nbformat.v4.new_notebook()
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",  # this interpreter: the .venv the tests run in
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )

    async def execute(cell: nbformat.NotebookNode) -> None:
        """Run a cell after those already run (added to the notebook, where nbclient wants it)."""
        notebook.cells.append(cell)
        await client.async_execute_cell(cell, len(notebook.cells) - 1)

    async def step(source: str) -> str | None:
        try:
            await execute(_code(source))
        except CellExecutionError as error:
            return _COLOUR.sub("", str(error))
        return None

    started = time.perf_counter()
    async with client.async_setup_kernel():
        try:
            for cell in found.cells[: found.clean_up]:
                await execute(cell)
        except CellExecutionError as error:
            run.main = _COLOUR.sub("", str(error))
        else:
            run.main = None
            run.seconds["main"] = time.perf_counter() - started
            run.unexplained = [
                cell.source
                for cell, after in itertools.pairwise(found.cells)
                if cell.cell_type == "code" and cell.get("outputs") and after.cell_type != "markdown"
            ]
            started = time.perf_counter()
            await _exercise(run, found, step, number(path))
            run.seconds["exercises"] = time.perf_counter() - started
        # The clean-up runs even after a failure: a child server outlives its kernel otherwise.
        errors = [await step(c.source) for c in found.cells[found.clean_up :] if c.cell_type == "code"]
        errors.append(
            await step("from chatsse import registry as _r\nassert _r.running() == [], _r.running()")
        )
        run.clean_up = next((e for e in errors if e is not None), None)
    return run


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> dict[str, Run]:
    """Every notebook a selected test asks about (``-k 03``: notebook 03 only), at once."""
    wanted = {
        item.callspec.params["notebook"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    paths = [path for path in NOTEBOOK_FILES if number(path) in wanted]

    async def every() -> dict[str, Run]:
        results = await asyncio.gather(*(_execute(path) for path in paths))
        return {number(path): result for path, result in zip(paths, results, strict=True)}

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATSSE_QUICK", "1")  # the kernels inherit it
        patch.setenv("JUPYTER_PLATFORM_DIRS", "1")
        results = asyncio.run(every())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and request.config.get_verbosity() > 0:
        with capture.global_and_fixture_disabled():
            for name, run in results.items():
                times = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in run.seconds.items())
                reporter.write_line(f"notebook {name}: {times}")
    return results


EXERCISE_IDS = [
    (number(p), n)
    for p, found in ((p, structure(p)) for p in NOTEBOOK_FILES)
    if not isinstance(found, str)
    for n in range(1, len(found.blocks) + 1)
]
pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("notebook", [number(p) for p in NOTEBOOK_FILES])
def test_notebook_runs_to_its_clean_up_and_a_rerun_start_cell_replaces_its_server(
    runs: dict[str, Run], notebook: str
) -> None:
    run = runs[notebook]
    assert run.main is None, run.main
    assert run.rerun is None, run.rerun


@pytest.mark.parametrize("notebook", [number(p) for p in NOTEBOOK_FILES])
def test_every_result_is_followed_by_a_sentence_on_what_to_see_in_it(
    runs: dict[str, Run], notebook: str
) -> None:
    run = runs[notebook]
    assert run.main is None, f"the notebook itself failed: {run.main}"
    assert run.unexplained == []


@pytest.mark.parametrize(("notebook", "exercise"), EXERCISE_IDS, ids=[f"{nb}-{n}" for nb, n in EXERCISE_IDS])
def test_exercise_runs_as_written(runs: dict[str, Run], notebook: str, exercise: int) -> None:
    run = runs[notebook]
    assert run.main is None, f"the notebook itself failed: {run.main}"
    assert run.exercises[exercise] is None, run.exercises[exercise]


@pytest.mark.parametrize("notebook", [number(p) for p in NOTEBOOK_FILES])
def test_clean_up_stops_every_server_the_notebook_and_its_exercises_started(
    runs: dict[str, Run], notebook: str
) -> None:
    assert runs[notebook].clean_up is None, runs[notebook].clean_up


def test_every_check_names_an_exercise_that_exists() -> None:
    assert set(CHECKS) <= set(EXERCISE_IDS)
