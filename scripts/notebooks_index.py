"""The front page of the workbook's published pages (``make notebooks-html``): one row per
notebook with its title, its opening paragraph and a link to its executed page.

Usage: ``python scripts/notebooks_index.py NOTEBOOK.ipynb... --pages build/notebooks``
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mistune  # nbconvert's own Markdown renderer


@dataclass(frozen=True)
class Chapter:
    page: str  # the executed page's file name, next to the index
    title: str
    summary_html: str  # the notebook's opening paragraph, rendered


def chapter(notebook: Path) -> Chapter:
    """Title and opening paragraph from a notebook's first markdown cell."""
    cells = json.loads(notebook.read_text())["cells"]
    first = next(c for c in cells if c["cell_type"] == "markdown")
    text = "".join(first["source"]).strip()
    heading, _, body = text.partition("\n")
    paragraph = body.strip().split("\n\n")[0]
    return Chapter(
        page=notebook.with_suffix(".html").name,
        title=heading.lstrip("# ").strip(),
        summary_html=str(mistune.html(paragraph)).strip(),
    )


def render(chapters: list[Chapter], *, mode: str) -> str:
    rows = "\n".join(
        f'<li><a href="{html.escape(c.page)}">{html.escape(c.title)}</a>{c.summary_html}</li>'
        for c in chapters
    )
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chatsse workbook</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}
ul{{list-style:none;padding:0}} li{{margin-bottom:1rem}} a{{font-weight:600}} p{{margin:.25rem 0}}
footer{{color:#666;font-size:.9rem}}
</style>
</head><body>
<h1>chatsse workbook</h1>
<p>Each chapter below was run top to bottom; its page shows the code, its output and its figures.
To run them yourself: <code>make lab</code>.</p>
<ul>
{rows}
</ul>
<footer>Built {built}, in {html.escape(mode)} mode.</footer>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--pages", type=Path, required=True, help="the directory of the executed pages")
    parser.add_argument("--mode", default="full", help="how the notebooks were run: full or quick")
    args = parser.parse_args(argv)
    chapters = [chapter(nb) for nb in sorted(args.notebooks)]
    missing = [c.page for c in chapters if not (args.pages / c.page).is_file()]
    if missing:
        print(f"pages not built: {', '.join(missing)}", file=sys.stderr)
        return 1
    (args.pages / "index.html").write_text(render(chapters, mode=args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
