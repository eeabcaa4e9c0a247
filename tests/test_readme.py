"""The README documents every setting, metric and error type the code has."""

from __future__ import annotations

from pathlib import Path

from chatsse.conversations import ConversationError
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


def test_every_conversation_error_type_is_documented() -> None:
    types = {cls.type for cls in ConversationError.__subclasses__()}
    assert [t for t in types if f"`{t}`" not in README] == []


def test_first_screen_shows_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make run" in first_screen
    assert "make test" in first_screen
