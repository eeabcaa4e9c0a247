"""All of chatsse's settings, in one class.

Every field is read from an environment variable named ``CHATSSE_<FIELD>`` (or from a
``.env`` file). ``load_settings`` turns pydantic's validation errors into one
:class:`SettingsError` whose message names each bad variable. Time bounds derived from these
settings are computed in one place, chatsse/deadlines.py.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from chatsse.errors import ChatsseError
from chatsse.stores.urls import StoreURL, parse_store_url

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "env_name", "load_settings"]

ENV_PREFIX = "CHATSSE_"
ENV_FILE = ".env"
# Settings that were renamed: an old name left in the environment stops start-up rather than
# being silently ignored.
_RENAMED = {"max_concurrent_connections": "max_streams_per_worker"}


class SettingsError(ChatsseError, ValueError):
    """Raised at start-up when a setting has an invalid value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    debug: bool = False
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "console"] = "console"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_allow_credentials: bool = False

    # Access (chatsse/auth.py, chatsse/keys.py)
    keys_file: str = ""
    allow_open: bool = False
    operator_routes_open: bool = False

    # Limits across workers (chatsse/limits/; 0: none). A key's own, in the keys file, win.
    max_streams: int = Field(0, ge=0)
    key_max_streams: int = Field(0, ge=0)
    key_requests_per_minute: int = Field(0, ge=0)
    key_tokens_per_minute: int = Field(0, ge=0)
    limit_lease_ttl: float = Field(30.0, gt=0, le=3600)

    # Serving
    store: str = Field("memory", min_length=1)
    store_timeout: float = Field(5.0, gt=0, le=300)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    shutdown_grace_period: float = Field(10.0, ge=0, le=3600)
    keepalive: int = Field(5, ge=1, le=300)

    # The edge: what a client may send before the app answers (chatsse/connection.py)
    header_timeout: float = Field(10.0, gt=0, le=3600)
    body_timeout: float = Field(30.0, gt=0, le=3600)
    max_header_size: int = Field(16_384, ge=1024, le=1024 * 1024)
    max_headers: int = Field(100, ge=8, le=10_000)

    # Streaming
    sse_keepalive_interval: float = Field(15.0, gt=0, le=3600)
    sse_retry_ms: int = Field(3000, ge=0, le=3_600_000)
    max_streams_per_worker: int = Field(1000, ge=1)
    request_timeout: float = Field(300.0, gt=0)
    write_timeout: float = Field(10.0, gt=0, le=3600)
    engine_first_token_timeout: float = Field(60.0, gt=0)
    engine_idle_timeout: float = Field(30.0, gt=0)
    max_message_size: int = Field(16_384, ge=1, le=16 * 1024 * 1024)
    max_reply_tokens: int = Field(1024, ge=1, le=1_000_000)

    # Conversations
    max_history_length: int = Field(20, ge=1)
    conversation_ttl: float = Field(3600.0, gt=0)
    max_conversations: int = Field(10_000, ge=1)
    max_conversation_messages: int = Field(1000, ge=2)
    replay_log: bool = True
    replay_ttl: float = Field(300.0, gt=0)
    replay_flush_interval: float = Field(0.5, gt=0, le=10)
    resume_window: float = Field(10.0, ge=0, le=3600)

    # Engine: the simulated model, or an OpenAI-compatible upstream (chatsse/upstream.py)
    engine: Literal["simulated", "openai"] = "simulated"
    upstream_url: str = ""
    upstream_model: str = ""
    upstream_api_key: SecretStr = SecretStr("")
    upstream_max_connections: int = Field(100, ge=1, le=10_000)
    upstream_connect_timeout: float = Field(5.0, gt=0, le=300)
    upstream_retries: int = Field(1, ge=0, le=10)

    # Simulated engine (milliseconds)
    sim_ttft_ms: float = Field(150.0, ge=0)
    sim_prefill_ms_per_token: float = Field(0.5, ge=0)
    sim_token_interval_ms: float = Field(30.0, ge=0)
    sim_jitter: float = Field(0.2, ge=0, le=1)
    sim_reply_tokens_min: int = Field(20, ge=1)
    sim_reply_tokens_max: int = Field(80, ge=1)
    sim_seed: int = 0
    sim_max_concurrency: int = Field(0, ge=0)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        """Accept a comma-separated list or a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("keys_file")
    @classmethod
    def _check_keys_file(cls, value: str) -> str:
        if value:
            from chatsse.keys import read_keys

            read_keys(value)  # KeysFileError (a ValueError) says what is wrong with it
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        parse_store_url(value)
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "CHATSSE_CORS_ORIGINS must list explicit origins when "
                "CHATSSE_CORS_ALLOW_CREDENTIALS is true (browsers reject '*' with credentials)"
            )
        if self.sim_reply_tokens_min > self.sim_reply_tokens_max:
            raise ValueError("CHATSSE_SIM_REPLY_TOKENS_MIN must not exceed CHATSSE_SIM_REPLY_TOKENS_MAX")
        if self.engine == "openai":
            _check_upstream(self.upstream_url, self.upstream_model)
        if not self.keys_file and not self.allow_open and not is_loopback(self.host):
            raise ValueError(
                f"CHATSSE_HOST={self.host} is reachable from other machines, and no API keys are set: "
                "set CHATSSE_KEYS_FILE (make keys with `chatsse keys create`), or CHATSSE_ALLOW_OPEN=true "
                "to serve it open to anyone who can reach it"
            )
        return self

    @property
    def store_url(self) -> StoreURL:
        return parse_store_url(self.store)

    @property
    def store_is_chosen(self) -> bool:
        """Whether ``CHATSSE_STORE`` was set (environment, ``.env`` or an override)."""
        return "store" in self.model_fields_set


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_upstream(url: str, model: str) -> None:
    if not url:
        raise ValueError(
            "CHATSSE_UPSTREAM_URL must be set when CHATSSE_ENGINE=openai: the base URL of an "
            "OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"CHATSSE_UPSTREAM_URL must be an http(s) URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"CHATSSE_UPSTREAM_URL must be a base URL, without a query or fragment: {url!r}")
    if not model:
        raise ValueError(
            "CHATSSE_UPSTREAM_MODEL must be set when CHATSSE_ENGINE=openai: the model name the "
            "upstream serves (GET <CHATSSE_UPSTREAM_URL>/models lists them)"
        )


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and ``.env``), with keyword overrides on top."""
    _refuse_renamed(Path(ENV_FILE))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe_errors(exc)) from None


def _refuse_renamed(env_file: Path) -> None:
    names = set(os.environ)
    if env_file.is_file():
        from dotenv import dotenv_values

        names |= set(dotenv_values(env_file))
    for old, new in _RENAMED.items():
        if env_name(old) in names:
            raise SettingsError(f"invalid settings:\n  {env_name(old)} was renamed: set {env_name(new)}")


def _describe_errors(exc: ValidationError) -> str:
    """One line per bad setting, naming its environment variable."""
    lines = ["invalid settings:"]
    for error in exc.errors():
        loc = error.get("loc") or ()
        if loc:
            where = env_name(str(loc[0]))
            got = f" (got {error['input']!r})" if "input" in error else ""
        else:
            where, got = "settings", ""
        lines.append(f"  {where}: {error['msg']}{got}")
    return "\n".join(lines)
