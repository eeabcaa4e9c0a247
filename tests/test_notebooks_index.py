"""``scripts/notebooks_index.py``: the front page of the published notebooks links every
chapter, with the title and opening paragraph of the notebook itself."""

from __future__ import annotations

import html
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebooks_index", ROOT / "scripts" / "notebooks_index.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["notebooks_index"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_chapter_is_linked_with_its_own_title_and_opening(tmp_path: Path) -> None:
    script = _script()
    for notebook in NOTEBOOKS:
        (tmp_path / notebook.with_suffix(".html").name).write_text("<html></html>")
    assert script.main([*map(str, NOTEBOOKS), "--pages", str(tmp_path), "--mode", "quick"]) == 0
    index = (tmp_path / "index.html").read_text()
    for notebook in NOTEBOOKS:
        first = next(c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "markdown")
        title = "".join(first["source"]).splitlines()[0].lstrip("# ")
        assert f'<a href="{notebook.stem}.html">{html.escape(title)}</a>' in index
    assert index.index("01-") < index.index("02-")  # in the chapters' order
    assert "in quick mode" in index


def test_a_page_not_built_is_an_error_and_no_index_is_written(tmp_path: Path) -> None:
    script = _script()
    assert script.main([str(NOTEBOOKS[0]), "--pages", str(tmp_path)]) == 1
    assert not (tmp_path / "index.html").exists()


def test_the_opening_paragraph_is_rendered_from_markdown(tmp_path: Path) -> None:
    notebook = tmp_path / "10-example.ipynb"
    cell = {
        "cell_type": "markdown",
        "metadata": {},
        "source": ["# 10 · An example\n", "\n", "Uses `code` & *words*.\n"],
    }
    notebook.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    chapter = _script().chapter(notebook)
    assert chapter.title == "10 · An example"
    assert chapter.page == "10-example.html"
    assert chapter.summary_html == "<p>Uses <code>code</code> &amp; <em>words</em>.</p>"
