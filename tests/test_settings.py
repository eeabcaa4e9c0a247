"""Tests for chatsse.settings: defaults, CHATSSE_* variables, .env files and error messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from chatsse.settings import ENV_PREFIX, Settings, SettingsError, env_name, load_settings

_ENV_NAME = re.compile(r"CHATSSE_[A-Z0-9_]+")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CHATSSE_* variable from the outside, and a cwd without a .env file."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def names_in(message: str) -> set[str]:
    return set(_ENV_NAME.findall(message))


# --- defaults and sources --------------------------------------------------


def test_defaults_load() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.debug is False
    assert settings.cors_origins == []
    assert settings.cors_allow_credentials is False
    assert settings.sim_reply_tokens_min <= settings.sim_reply_tokens_max
    for name, field in Settings.model_fields.items():
        assert getattr(settings, name) == field.get_default(call_default_factory=True), name


def test_env_name_is_prefixed_upper_case_field() -> None:
    assert env_name("port") == "CHATSSE_PORT"
    assert env_name("sse_keepalive_interval") == "CHATSSE_SSE_KEEPALIVE_INTERVAL"


def test_prefixed_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_PORT", "9123")
    monkeypatch.setenv("CHATSSE_HOST", "0.0.0.0")
    monkeypatch.setenv("CHATSSE_ALLOW_OPEN", "true")
    monkeypatch.setenv("CHATSSE_DEBUG", "true")
    monkeypatch.setenv("CHATSSE_LOG_LEVEL", "debug")
    monkeypatch.setenv("CHATSSE_SIM_JITTER", "0.5")
    monkeypatch.setenv("CHATSSE_SIM_SEED", "-7")
    settings = load_settings()
    assert settings.port == 9123
    assert settings.host == "0.0.0.0"
    assert settings.debug is True
    assert settings.log_level == "debug"
    assert settings.sim_jitter == 0.5
    assert settings.sim_seed == -7


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("HOST", "10.0.0.1")
    settings = load_settings()
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"


def test_env_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("chatsse_port", "9124")
    assert load_settings().port == 9124


def test_keyword_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_PORT", "9123")
    assert load_settings(port=9200).port == 9200


def test_dotenv_file_in_working_directory_is_read(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(
        "CHATSSE_PORT=7001\nCHATSSE_MAX_REPLY_TOKENS=64\nCHATSSE_CORS_ORIGINS=https://a.example\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert settings.port == 7001
    assert settings.max_reply_tokens == 64
    assert settings.cors_origins == ["https://a.example"]


def test_environment_wins_over_dotenv(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_environment / ".env").write_text("CHATSSE_PORT=7001\nCHATSSE_HOST=0.0.0.0\nCHATSSE_ALLOW_OPEN=1\n")
    monkeypatch.setenv("CHATSSE_PORT", "7002")
    settings = load_settings()
    assert settings.port == 7002
    assert settings.host == "0.0.0.0"


def test_invalid_value_in_dotenv_names_the_variable(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text("CHATSSE_PORT=not-a-port\n")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert names_in(str(info.value)) == {"CHATSSE_PORT"}


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


# --- CORS origins ----------------------------------------------------------


def test_cors_origins_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", " https://a.example , https://b.example:8443,, ")
    assert load_settings().cors_origins == ["https://a.example", "https://b.example:8443"]


def test_cors_origins_single_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", "http://localhost:3000")
    assert load_settings().cors_origins == ["http://localhost:3000"]


def test_cors_origins_empty_string_is_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", "")
    assert load_settings().cors_origins == []


def test_cors_origins_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    origins = ["https://a.example", "https://b.example"]
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", "  " + json.dumps(origins))
    assert load_settings().cors_origins == origins


def test_cors_origins_invalid_json_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", '["https://a.example"')
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert names_in(str(info.value)) == {"CHATSSE_CORS_ORIGINS"}


def test_star_origin_with_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", "*")
    monkeypatch.setenv("CHATSSE_CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "CHATSSE_CORS_ORIGINS" in message
    assert "CHATSSE_CORS_ALLOW_CREDENTIALS" in message


def test_star_origin_without_credentials_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", "*")
    assert load_settings().cors_origins == ["*"]


def test_explicit_origins_with_credentials_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_CORS_ORIGINS", "https://a.example")
    monkeypatch.setenv("CHATSSE_CORS_ALLOW_CREDENTIALS", "1")
    settings = load_settings()
    assert settings.cors_allow_credentials is True
    assert settings.cors_origins == ["https://a.example"]


# --- invalid values --------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHATSSE_PORT", "abc"),
        ("CHATSSE_PORT", "70000"),
        ("CHATSSE_PORT", "-1"),
        ("CHATSSE_SSE_KEEPALIVE_INTERVAL", "0"),
        ("CHATSSE_LOG_FORMAT", "xml"),
        ("CHATSSE_LOG_LEVEL", "verbose"),
        ("CHATSSE_DEBUG", "maybe"),
        ("CHATSSE_SIM_JITTER", "1.5"),
        ("CHATSSE_MAX_CONVERSATION_MESSAGES", "1"),
        ("CHATSSE_REQUEST_TIMEOUT", "0"),
        ("CHATSSE_HEADER_TIMEOUT", "0"),
        ("CHATSSE_BODY_TIMEOUT", "-1"),
        ("CHATSSE_MAX_HEADER_SIZE", "100"),
        ("CHATSSE_MAX_HEADERS", "0"),
    ],
)
def test_invalid_value_raises_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert names_in(message) == {variable}
    assert repr(value) in message  # the offending input is shown
    assert isinstance(info.value, ValueError)


def test_every_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_PORT", "abc")
    monkeypatch.setenv("CHATSSE_LOG_FORMAT", "xml")
    monkeypatch.setenv("CHATSSE_HOST", "0.0.0.0")  # valid: must not be named
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert names_in(str(info.value)) == {"CHATSSE_PORT", "CHATSSE_LOG_FORMAT"}


def test_invalid_keyword_override_names_the_variable() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(sse_keepalive_interval=0)
    assert names_in(str(info.value)) == {"CHATSSE_SSE_KEEPALIVE_INTERVAL"}


def test_min_reply_tokens_above_max_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_SIM_REPLY_TOKENS_MIN", "50")
    monkeypatch.setenv("CHATSSE_SIM_REPLY_TOKENS_MAX", "10")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert names_in(str(info.value)) == {
        "CHATSSE_SIM_REPLY_TOKENS_MIN",
        "CHATSSE_SIM_REPLY_TOKENS_MAX",
    }


def test_equal_min_and_max_reply_tokens_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_SIM_REPLY_TOKENS_MIN", "30")
    monkeypatch.setenv("CHATSSE_SIM_REPLY_TOKENS_MAX", "30")
    settings = load_settings()
    assert settings.sim_reply_tokens_min == settings.sim_reply_tokens_max == 30


def test_a_renamed_variable_stops_start_up_naming_the_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSSE_MAX_CONCURRENT_CONNECTIONS", "10")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert names_in(str(error.value)) == {
        "CHATSSE_MAX_CONCURRENT_CONNECTIONS",
        "CHATSSE_MAX_STREAMS_PER_WORKER",
    }


def test_a_renamed_variable_in_dotenv_stops_start_up_too(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text("CHATSSE_MAX_CONCURRENT_CONNECTIONS=10\n")
    with pytest.raises(SettingsError, match="CHATSSE_MAX_STREAMS_PER_WORKER"):
        load_settings()


def test_store_is_chosen_only_when_set(monkeypatch: pytest.MonkeyPatch, clean_environment: Path) -> None:
    assert load_settings().store_is_chosen is False
    (clean_environment / ".env").write_text("CHATSSE_STORE=sqlite:///x.db\n")
    assert load_settings().store_is_chosen is True
    assert load_settings().store_url.path == "x.db"
