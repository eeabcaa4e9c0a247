"""Limits in the SQLite file of the conversations (``CHATSSE_STORE=sqlite:///...``): every
worker of the machine shares them. Each decision is one ``BEGIN IMMEDIATE`` transaction, which
holds the file's write lock from its first read to its last write, so no two workers decide
on the same state."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from chatsse.ids import new_id
from chatsse.limits.base import Admission, Bucket, HeldLeases, Quota, charge, decide, rate_headers, refusal
from chatsse.stores.sqlite import SQLiteStore, _transaction

__all__ = ["SQLiteLimiter"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS limit_leases (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS limit_leases_by_owner ON limit_leases (owner, expires_at);
CREATE INDEX IF NOT EXISTS limit_leases_by_expiry ON limit_leases (expires_at);
CREATE TABLE IF NOT EXISTS limit_buckets (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    level REAL NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (owner, kind)
) WITHOUT ROWID;
"""
_IDLE = 120.0  # seconds after which a bucket is full again whatever it held: its row can go


def _create(conn: sqlite3.Connection) -> None:
    with _transaction(conn, "IMMEDIATE"):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)


def _bucket(conn: sqlite3.Connection, owner: str, kind: str) -> Bucket | None:
    row = conn.execute(
        "SELECT level, at FROM limit_buckets WHERE owner = ? AND kind = ?", (owner, kind)
    ).fetchone()
    return None if row is None else Bucket(*row)


def _save(conn: sqlite3.Connection, owner: str, kind: str, bucket: Bucket | None) -> None:
    if bucket is not None:
        conn.execute(
            "INSERT INTO limit_buckets VALUES (?, ?, ?, ?)"
            " ON CONFLICT (owner, kind) DO UPDATE SET level = excluded.level, at = excluded.at",
            (owner, kind, bucket.level, bucket.at),
        )


class SQLiteLimiter:
    """Time is the machine's clock (``time.time``), one clock for every worker of the file."""

    def __init__(
        self, store: SQLiteStore, *, lease_ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._clock = clock
        self.lease_ttl = lease_ttl
        self._leases = HeldLeases(lease_ttl, self._renew)
        store.run_now(_create)

    async def admit(self, owner: str, quota: Quota) -> Admission:
        now = self._clock()
        lease = new_id("lease_") if quota.leases else None

        def admit(conn: sqlite3.Connection) -> Admission:
            with _transaction(conn, "IMMEDIATE"):
                conn.execute("DELETE FROM limit_leases WHERE expires_at <= ?", (now,))
                conn.execute("DELETE FROM limit_buckets WHERE at <= ?", (now - _IDLE,))
                key_streams = all_streams = 0
                if quota.max_streams:
                    (key_streams,) = conn.execute(
                        "SELECT COUNT(*) FROM limit_leases WHERE owner = ?", (owner,)
                    ).fetchone()
                if quota.server_streams:
                    (all_streams,) = conn.execute("SELECT COUNT(*) FROM limit_leases").fetchone()
                requests, tokens = _bucket(conn, owner, "requests"), _bucket(conn, owner, "tokens")
                decision = decide(quota, now, requests, tokens, key_streams, all_streams)
                _save(conn, owner, "requests", decision.requests)
                _save(conn, owner, "tokens", decision.tokens)
                if decision.refused is not None:
                    raise refusal(quota, decision)
                if lease is not None:
                    conn.execute(
                        "INSERT INTO limit_leases VALUES (?, ?, ?)", (lease, owner, now + self.lease_ttl)
                    )
                return Admission(owner, quota, lease, rate_headers(quota, decision))

        admission = await self._store.run(admit)
        if lease is not None:
            self._leases.add(lease, owner)
        return admission

    async def finish(self, admission: Admission, tokens: int) -> None:
        owner, quota, lease = admission.owner, admission.quota, admission.lease
        if lease is not None:
            self._leases.discard(lease)
        if lease is None and not quota.tokens_per_minute:
            return
        now = self._clock()

        def finish(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                if lease is not None:
                    conn.execute("DELETE FROM limit_leases WHERE id = ?", (lease,))
                bucket = charge(_bucket(conn, owner, "tokens"), quota.tokens_per_minute, tokens, now)
                _save(conn, owner, "tokens", bucket)

        await self._store.run(finish)

    async def _renew(self, held: dict[str, str]) -> None:
        expires_at = self._clock() + self.lease_ttl

        def renew(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "IMMEDIATE"):
                conn.executemany(
                    "UPDATE limit_leases SET expires_at = ? WHERE id = ?",
                    [(expires_at, lease) for lease in held],
                )

        await self._store.run(renew)

    async def close(self) -> None:
        await self._leases.close()
