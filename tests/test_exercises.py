"""The notebooks' layout, and the copies with their exercises that ``make test`` runs
(tests/exercised.py): every notebook has exercises with code and a clean-up; the copy keeps
the notebook's cells and adds each exercise, its check and the last checks; a failing exercise
fails the copy; a result with no sentence after it is found."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from exercised import CHECKS, INSERTED, exercised, number, sections, unexplained_results
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]-*.ipynb"))


def _notebook(tmp_path: Path, *cells: nbformat.NotebookNode, name: str = "10-example.ipynb") -> Path:
    path = tmp_path / name
    nbformat.write(nbformat.v4.new_notebook(cells=list(cells)), path)
    return path


def _md(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(source)


def _code(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_ends_with_exercises_that_hold_their_code_then_a_clean_up(path: Path) -> None:
    found = sections(path)
    assert found.blocks, "no exercise"
    assert all(block.strip() for block in found.blocks)


def test_every_check_names_an_exercise_that_exists() -> None:
    exercises = {(number(p), n) for p in NOTEBOOKS for n in range(1, len(sections(p).blocks) + 1)}
    assert set(CHECKS) <= exercises


def test_the_copy_keeps_every_cell_and_adds_the_exercises_their_checks_and_the_last_checks() -> None:
    path = NOTEBOOKS[0]
    original, found = nbformat.read(path, as_version=4), sections(path)
    copy = exercised(path)
    own = [cell for cell in copy.cells if INSERTED not in cell.metadata]
    assert [c.source for c in own] == [c.source for c in original.cells]  # unchanged, in order
    added = [cell.metadata[INSERTED] for cell in copy.cells if INSERTED in cell.metadata]
    expected = ["run where the notebook lives"]
    for n in range(1, len(found.blocks) + 1):
        expected.append(f"exercise {n}")
        if (number(path), n) in CHECKS:
            expected.append(f"what exercise {n} says will happen")
    assert added == [*expected, "a start cell run again replaces its server", "nothing left running"]
    assert copy.cells[-1].source.endswith("assert registry.running() == [], registry.running()")
    first_exercise = next(c for c in copy.cells if c.metadata.get(INSERTED) == "exercise 1")
    assert found.blocks[0].strip() in first_exercise.source


def test_a_notebook_whose_exercise_has_no_code_is_refused(tmp_path: Path) -> None:
    path = _notebook(
        tmp_path, _md("## Try it yourself"), _md("**1.** Think about it."), _md("## Clean up"), _code("1")
    )
    with pytest.raises(ValueError, match="an exercise without code"):
        sections(path)


def test_a_failing_exercise_fails_the_copy_in_a_real_kernel(tmp_path: Path) -> None:
    path = _notebook(
        tmp_path,
        _md("# 10 · An example"),
        _code('from chatsse import registry\nname="unused"'),
        _md("## Try it yourself"),
        _md("**1.** Divide.\n\n```python\nresult = 1 / 0\n```"),
        _md("## Clean up"),
        _code("registry.stop_all()"),
    )
    client = NotebookClient(exercised(path), timeout=60, kernel_name="python3")
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        client.execute()


def test_a_result_with_no_sentence_after_it_is_found() -> None:
    shown = _code("1 + 1")
    shown.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"})]
    quiet = _code("x = 1")
    explained = _code("2 + 2")
    explained.outputs = list(shown.outputs)
    added = _code("3 + 3")
    added.outputs = list(shown.outputs)
    added.metadata[INSERTED] = "a check"
    executed = nbformat.v4.new_notebook(cells=[explained, _md("Four."), quiet, shown, added, _code("y = 2")])
    assert unexplained_results(executed) == ["1 + 1"]  # the copy's own cells are not the notebook's
