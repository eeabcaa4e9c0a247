"""API keys: the keys file, and checking a presented key against it.

A key is ``csk_<id>_<secret>``: the id names the key (in logs, limits, and as the owner of
the conversations made with it); the secret is 32 random bytes. The keys file
(``CHATSSE_KEYS_FILE``, written by ``chatsse keys``) holds each key's id, name, limits and the
SHA-256 of the whole key, never the key itself. A plain hash is enough because the secret is
random and long: a slow password hash guards guessable passwords, which these are not.

Checking a key costs one SHA-256 and one constant-time comparison, whether or not its id is
known, so the answer's timing says nothing of which ids exist. The file is re-read when it
changes (looked at once a second at most), so a revoked key stops working on every worker
within about a second, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from chatsse.errors import ChatsseError
from chatsse.logs import get_logger

__all__ = ["ApiKey", "KeyLimits", "KeyRing", "KeysFileError", "create_key", "read_keys", "revoke_key"]

log = get_logger("chatsse.keys")

PREFIX = "csk_"
_KEY = re.compile(r"^csk_([a-z0-9]{8})_([A-Za-z0-9_-]{43})$")
_HASH = "sha256:"
_DUMMY_HASH = _HASH + hashlib.sha256(b"chatsse: no such key").hexdigest()
_CHECK_EVERY = 1.0  # seconds between two looks at the keys file for changes
FILE_VERSION = 1


class KeysFileError(ChatsseError, ValueError):
    """The keys file is missing or not a keys file."""


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """One key's limits (chatsse/limits/); None: the server's default (``CHATSSE_KEY_*``)."""

    max_streams: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0 (got {value!r})")


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    hash: str
    created_at: float
    admin: bool = False  # may read /metrics and /stats
    revoked_at: float | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApiKey:
        limits = KeyLimits(**(data.get("limits") or {}))
        return cls(**{**data, "limits": limits})


def hash_key(key: str) -> str:
    return _HASH + hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | os.PathLike[str]) -> dict[str, ApiKey]:
    """The keys of a keys file, by id; ``KeysFileError`` naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeysFileError(f"no keys file at {path}: make one with `chatsse keys create`") from None
    except (OSError, ValueError) as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != FILE_VERSION
        or not isinstance(data.get("keys"), list)
    ):
        raise KeysFileError(f"{path} is not a chatsse keys file (version {FILE_VERSION})")
    keys: dict[str, ApiKey] = {}
    for entry in data["keys"]:
        try:
            key = ApiKey.from_dict(entry)
        except (TypeError, ValueError) as exc:
            raise KeysFileError(f"a key in {path} is invalid: {exc}") from None
        if not re.fullmatch(r"[a-z0-9]{8}", key.id) or not key.hash.startswith(_HASH):
            raise KeysFileError(f"a key in {path} has an invalid id or hash: {key.id!r}")
        keys[key.id] = key
    return keys


def _write_keys(path: Path, keys: dict[str, ApiKey]) -> None:
    """Replace the file at once (a reader sees the old file or the new one), readable by its
    owner only."""
    text = json.dumps({"version": FILE_VERSION, "keys": [k.to_dict() for k in keys.values()]}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def create_key(
    path: str | os.PathLike[str], name: str, *, admin: bool = False, limits: KeyLimits | None = None
) -> tuple[ApiKey, str]:
    """Add a key to the keys file (made if missing): its record, and the key, which is shown
    this once and kept nowhere."""
    file = Path(path)
    keys = read_keys(file) if file.exists() else {}
    key_id = secrets.token_hex(4)
    while key_id in keys:
        key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(key_id, name, hash_key(key), round(time.time(), 3), admin, None, limits or KeyLimits())
    _write_keys(file, {**keys, key_id: record})
    return record, key


def revoke_key(path: str | os.PathLike[str], key_id: str) -> ApiKey:
    """Mark a key revoked (it stays in the file, to say when); ``KeyError`` if unknown."""
    file = Path(path)
    keys = read_keys(file)
    if key_id not in keys:
        raise KeyError(key_id)
    record = keys[key_id]
    if record.revoked_at is None:
        record = replace(record, revoked_at=round(time.time(), 3))
        _write_keys(file, {**keys, key_id: record})
    return record


class KeyRing:
    """The keys a server accepts: a keys file, re-read when it changes."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._clock = clock
        self._stamp = self._file_stamp()
        self._keys = read_keys(self.path)  # a bad file stops start-up
        self._checked = clock()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < _CHECK_EVERY:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            keys = read_keys(self.path)
        except KeysFileError as exc:  # keep serving with the keys it had; say why
            log.error("keys_file_unreadable", error=str(exc))
            return
        self._stamp, self._keys = stamp, keys

    @property
    def keys(self) -> dict[str, ApiKey]:
        self._refresh()
        return self._keys

    def authenticate(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` is, or None: unknown, wrong, revoked or malformed alike."""
        found = _KEY.match(presented)
        record = self.keys.get(found[1]) if found is not None else None
        expected = record.hash if record is not None and record.revoked_at is None else _DUMMY_HASH
        matched = hmac.compare_digest(expected, hash_key(presented))
        return record if matched and expected is not _DUMMY_HASH else None
