"""All of chatsse's settings, in one class.

Every field is read from an environment variable named ``CHATSSE_<FIELD>`` (or from a
``.env`` file). ``load_settings`` turns pydantic's validation errors into one
:class:`SettingsError` whose message names each bad variable.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CHATSSE_"


class SettingsError(ValueError):
    """Raised at start-up when a setting has an invalid value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
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

    # Serving
    store: str = Field("memory", min_length=1)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    shutdown_grace_period: float = Field(10.0, ge=0, le=3600)
    keepalive: int = Field(5, ge=1, le=300)

    # Streaming
    sse_keepalive_interval: float = Field(15.0, gt=0, le=3600)
    sse_retry_ms: int = Field(3000, ge=0, le=3_600_000)
    max_concurrent_connections: int = Field(1000, ge=1)
    request_timeout: float = Field(300.0, gt=0)
    max_message_size: int = Field(16_384, ge=1, le=16 * 1024 * 1024)
    max_reply_tokens: int = Field(1024, ge=1, le=1_000_000)

    # Conversations
    max_history_length: int = Field(20, ge=1)
    conversation_ttl: float = Field(3600.0, gt=0)
    max_conversations: int = Field(10_000, ge=1)
    max_conversation_messages: int = Field(1000, ge=2)

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

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value == "memory" or value.startswith(("redis://", "rediss://")):
            return value
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        raise ValueError(
            "expected 'memory', 'sqlite:///relative/path.db', 'sqlite:////absolute/path.db' "
            "or 'redis://host:port/db'"
        )

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "CHATSSE_CORS_ORIGINS must list explicit origins when "
                "CHATSSE_CORS_ALLOW_CREDENTIALS is true (browsers reject '*' with credentials)"
            )
        if self.sim_reply_tokens_min > self.sim_reply_tokens_max:
            raise ValueError("CHATSSE_SIM_REPLY_TOKENS_MIN must not exceed CHATSSE_SIM_REPLY_TOKENS_MAX")
        return self

    @property
    def lock_ttl(self) -> float:
        """How long a turn lock outlives a worker that died holding it."""
        return self.request_timeout + self.shutdown_grace_period + 30


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and ``.env``), with keyword overrides on top."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
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
