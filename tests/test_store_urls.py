"""chatsse.stores.urls (the CHATSSE_STORE grammar, in one place) and open_store."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatsse.settings import Settings, SettingsError, load_settings
from chatsse.stores import StoreLimits, open_store, parse_store_url
from chatsse.stores.memory import MemoryStore
from chatsse.stores.redis import RedisStore
from chatsse.stores.sqlite import SQLiteStore

LIMITS = StoreLimits(ttl=60, max_conversations=5, max_messages=5, lock_ttl=30)
BAD_URLS = [
    "",
    "Memory",
    "memory://",
    "sqlite:///",
    "sqlite://chat.db",
    "sqlite:chat.db",
    "chat.db",
    "redis:/localhost",
    "postgres://localhost/chat",
]


@pytest.mark.parametrize(
    ("url", "kind", "shared"),
    [
        ("memory", "memory", False),
        ("sqlite:///data/chat.db", "sqlite", True),
        ("sqlite:////abs/chat.db", "sqlite", True),
        ("redis://localhost:6379/0", "redis", True),
        ("rediss://u:p@cache:6380/2", "redis", True),
    ],
)
def test_parse_store_url(url: str, kind: str, shared: bool) -> None:
    parsed = parse_store_url(url)
    assert (parsed.kind, parsed.url, parsed.shared) == (kind, url, shared)


def test_sqlite_paths_relative_and_absolute() -> None:
    assert parse_store_url("sqlite:///data/chat.db").path == "data/chat.db"
    assert parse_store_url("sqlite:////abs/chat.db").path == "/abs/chat.db"
    with pytest.raises(ValueError, match="no file path"):
        _ = parse_store_url("memory").path


@pytest.mark.parametrize("url", BAD_URLS)
def test_open_store_refuses_other_urls_naming_every_form(url: str) -> None:
    with pytest.raises(ValueError, match="CHATSSE_STORE") as error:
        open_store(url, LIMITS, timeout=1)
    text = str(error.value)
    for form in (
        "'memory'",
        "sqlite:///relative/path.db",
        "sqlite:////absolute/path.db",
        "redis://host:port/db",
    ):
        assert form in text
    assert f"(got {url!r})" in text


@pytest.mark.parametrize("url", BAD_URLS[1:])
def test_settings_use_the_same_grammar(url: str) -> None:
    with pytest.raises(SettingsError, match=r"CHATSSE_STORE: .*sqlite:////absolute/path\.db"):
        load_settings(store=url)


def test_errors_hide_passwords() -> None:
    with pytest.raises(ValueError, match="CHATSSE_STORE") as error:
        open_store("redis+tls://user:hunter2@cache.internal:6379/0", LIMITS, timeout=1)
    assert "hunter2" not in str(error.value)
    assert "user:***@cache.internal" in str(error.value)


@pytest.mark.anyio
async def test_open_memory_store() -> None:
    store = open_store("memory", LIMITS, timeout=1)
    assert isinstance(store, MemoryStore)
    assert (store.name, store.limits) == ("memory", LIMITS)
    await store.close()


@pytest.mark.anyio
async def test_open_sqlite_store_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/chat.db", LIMITS, timeout=1)
    try:
        assert isinstance(store, SQLiteStore)
        assert (store.name, store.path, store.limits) == ("sqlite", "data/chat.db", LIMITS)
        await store.create("c1")
    finally:
        await store.close()
    assert (tmp_path / "data" / "chat.db").is_file()


@pytest.mark.anyio
async def test_open_sqlite_store_absolute_path(tmp_path: Path) -> None:
    store = open_store(
        Settings(_env_file=None, store=f"sqlite:///{tmp_path / 'chat.db'}").store_url, LIMITS, timeout=1
    )  # type: ignore[call-arg]
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(tmp_path / "chat.db")
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://user:pw@redis.example:6380/2"])
async def test_open_redis_store(url: str) -> None:
    store = open_store(url, LIMITS, timeout=1)  # connects on first use, not here
    try:
        assert isinstance(store, RedisStore)
        assert (store.name, store.limits, store.prefix) == ("redis", LIMITS, "chatsse:")
    finally:
        await store.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
