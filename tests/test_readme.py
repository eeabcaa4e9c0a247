"""The README documents every setting, metric and error type the code has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Serve

from chatsse import protocol
from chatsse.metrics import Metrics
from chatsse.settings import Settings, env_name

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_settings_table() -> None:
    missing = [env_name(f) for f in Settings.model_fields if f"| `{env_name(f)}` |" not in README]
    assert missing == []


def test_every_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    missing = [n for n in names if f"`{n}" not in README]
    assert missing == []


def test_every_error_type_is_in_the_errors_table_with_its_status() -> None:
    missing = [t for t, status in protocol.HTTP_ERRORS.items() if f"| {status} | `{t}` |" not in README]
    assert missing == []


def test_every_way_a_stream_ends_is_in_the_endings_table() -> None:
    missing = []
    for outcome, ending in protocol.ENDINGS.items():
        row = f"| `{outcome}` | {f'`{ending.error_type}`' if ending.error_type else '—'} | "
        row += f"{f'`{ending.finish_reason}`' if ending.finish_reason else 'not stored'} |"
        if row not in README:
            missing.append(row)
    assert missing == []


def test_first_screen_shows_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make run" in first_screen
    assert "make test" in first_screen


def test_the_openai_sdk_snippet_runs_against_a_server(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    section = README.split("## OpenAI APIs", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    server = serve()
    code = snippet.replace("http://127.0.0.1:8000/v1", f"{server.url}/v1")
    assert code != snippet
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    namespace["client"].close()
    printed = capsys.readouterr().out
    assert "completion_tokens=" in printed  # the usage chunk came last
    assert len(printed) > 200  # and the replies' text before it
