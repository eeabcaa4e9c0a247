"""Every notebook with its exercises: what ``make test``'s nbmake run executes.

For each notebook this writes a copy (``python tests/exercised.py OUT notebooks/*.ipynb``)
holding, in order: every cell before its "Clean up" section, unchanged; the code of each "Try
it yourself" exercise (the fenced ``python`` blocks of its markdown cell), each followed by the
check below where the exercise states an outcome; its first cell that starts a named server
run again, which must replace that server rather than add one; the clean-up cells; and a last
cell asserting that nothing is left running. nbmake executes the copies, so one run of a
notebook checks the notebook, its exercises and its clean-up; and
:func:`unexplained_results` reads the executed copy (``--overwrite``) for results that no
sentence explains (``tests/conftest.py`` fails the notebook's test on any).

The copy runs from the notebooks' directory (its first cell changes to it), so the paths a
notebook uses are the ones it would use in JupyterLab.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

EXERCISES = "## Try it yourself"
CLEAN_UP = "## Clean up"
INSERTED = "chatsse_inserted"  # metadata key of the cells a copy adds: what each one checks
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

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
from itertools import combinations
from statistics import median
# TTFT per prompt token, the median of every pair's slope: one turn a busy machine delayed does not decide it
slope = lambda points: median((t2 - t1) / (p2 - p1) for (p1, t1), (p2, t2) in combinations(points, 2))
assert slope(flat) < slope(full) / 2
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
    ("06", 2): """
try:
    client.responses.retrieve(loose.id)
    raise AssertionError("a response made with store: false was kept")
except openai.NotFoundError:
    pass
""",
    ("07", 1): 'assert stored["finish_reason"] == "interrupted"',
    ("08", 1): "assert answer.status_code == 401",
    ("08", 2): "assert answer.status_code == 429",
    ("08", 4): 'assert missing and {m.why for m in missing} == {"conversation not found"}',
}


@dataclass
class Sections:
    """A notebook's cells, where its clean-up begins, and each exercise's code."""

    cells: list[nbformat.NotebookNode]
    clean_up: int
    blocks: list[str]


def number(path: Path) -> str:
    return path.name[:2]


def sections(path: Path) -> Sections:
    """The notebook's parts; ``ValueError`` saying what is wrong with its layout."""
    notebook = nbformat.read(path, as_version=4)
    headings = [
        (i, cell.source.splitlines()[0])
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "markdown"
    ]
    starts = [i for i, first in headings if first.lower().startswith(EXERCISES.lower())]
    ends = [i for i, first in headings if first.lower().startswith(CLEAN_UP.lower())]
    if len(starts) != 1 or len(ends) != 1:
        raise ValueError(f"{path.name}: one {EXERCISES!r} and one {CLEAN_UP!r} section expected")
    start, end = starts[0], ends[0]
    if not start < end:
        raise ValueError(f"{path.name}: the exercises come before the clean-up")
    if not any(c.cell_type == "code" for c in notebook.cells[end:]):
        raise ValueError(f"{path.name}: no clean-up cell")
    if any(c.cell_type == "code" for c in notebook.cells[start:end]):
        raise ValueError(f"{path.name}: an exercise's code belongs in its markdown, for the learner to copy")
    blocks = []
    for cell in notebook.cells[start + 1 : end]:
        code = "".join(_BLOCK.findall(cell.source))
        if not code:
            raise ValueError(f"{path.name}: an exercise without code: {cell.source[:80]!r}")
        blocks.append(code)
    return Sections(notebook.cells, end, blocks)


def _cell(source: str, what: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(f"# {what}\n{source.strip()}")
    cell.metadata[INSERTED] = what
    return cell


def exercised(path: Path) -> nbformat.NotebookNode:
    """The copy of the notebook at ``path`` that ``make test`` runs (module docstring)."""
    found = sections(path)
    notebook = nbformat.read(path, as_version=4)
    cells = [_cell(f"import os\nos.chdir({str(path.resolve().parent)!r})", "run where the notebook lives")]
    cells += found.cells[: found.clean_up]
    for n, block in enumerate(found.blocks, 1):
        cells.append(_cell(block, f"exercise {n}"))
        check = CHECKS.get((number(path), n))
        if check is not None:
            cells.append(_cell(check, f"what exercise {n} says will happen"))
    starts = [c for c in found.cells[: found.clean_up] if c.cell_type == "code" and 'name="' in c.source]
    if not starts:
        raise ValueError(f"{path.name}: no cell starts a named server")
    rerun = (
        "from chatsse import registry as _registry\n_before = len(_registry.running())\n"
        f"{starts[0].source}\nassert len(_registry.running()) == _before, 'a rerun added a server'"
    )
    cells.append(_cell(rerun, "a start cell run again replaces its server"))
    cells += found.cells[found.clean_up :]
    cells.append(
        _cell(
            "from chatsse import registry\nassert registry.running() == [], registry.running()",
            "nothing left running",
        )
    )
    notebook.cells = cells
    return notebook


def unexplained_results(executed: nbformat.NotebookNode) -> list[str]:
    """The notebook's own cells with an output that no markdown cell follows (in the notebook
    itself: the cells a copy adds are left out)."""
    own = [cell for cell in executed.cells if INSERTED not in cell.metadata]
    return [
        cell.source
        for cell, after in itertools.pairwise(own)
        if cell.cell_type == "code" and cell.get("outputs") and after.cell_type != "markdown"
    ]


def main(argv: list[str]) -> int:
    out, paths = Path(argv[0]), [Path(p) for p in argv[1:]]
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.ipynb"):
        stale.unlink()
    for path in paths:
        nbformat.write(exercised(path), out / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
