"""The grammar of ``CHATSSE_STORE``, once: ``memory``, ``sqlite:///path.db``, ``redis://...``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["DEFAULT_SHARED_STORE", "STORE_FORMS", "StoreURL", "parse_store_url"]

StoreKind = Literal["memory", "sqlite", "redis"]
STORE_FORMS = (
    "'memory', 'sqlite:///relative/path.db', 'sqlite:////absolute/path.db', "
    "'redis://host:port/db' or 'rediss://host:port/db'"
)
DEFAULT_SHARED_STORE = "sqlite:///.chatsse/conversations.db"
"""The store of a server with several workers when ``CHATSSE_STORE`` is not set."""

_SQLITE = "sqlite:///"


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed ``CHATSSE_STORE``."""

    kind: StoreKind
    url: str

    @property
    def path(self) -> str:
        """The SQLite file (relative paths are relative to the working directory)."""
        if self.kind != "sqlite":
            raise ValueError(f"{self.kind} has no file path")
        return self.url.removeprefix(_SQLITE)

    @property
    def shared(self) -> bool:
        """Whether several worker processes can share it."""
        return self.kind != "memory"

    def redacted(self) -> str:
        return _redact(self.url)


def _redact(url: str) -> str:
    """The URL without its password, fit for an error message or a log line."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def parse_store_url(url: str) -> StoreURL:
    """ValueError, naming the accepted forms, for anything else."""
    if url == "memory":
        return StoreURL("memory", url)
    if url.startswith(_SQLITE) and len(url) > len(_SQLITE):
        return StoreURL("sqlite", url)
    if url.startswith(("redis://", "rediss://")):
        return StoreURL("redis", url)
    raise ValueError(f"expected {STORE_FORMS} (got {_redact(url)!r})")
